mod common;
use common::*;

#[test]
fn programs_load_and_pin() {
    if !root_or_skip("programs_load_and_pin") {
        return;
    }
    let cfg = node_config("load");
    let n = load(&cfg);
    assert!(cfg.pin_dir.join("snas_jobs").exists());
    drop(n);
    assert!(!cfg.pin_dir.exists());
}
