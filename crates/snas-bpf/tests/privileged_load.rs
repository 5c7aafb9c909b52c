//! The tier-1 programs load and pin (root; fails, saying so, otherwise).

mod common;
use common::*;

#[test]
fn programs_load_and_pin() {
    require_root("programs_load_and_pin");
    let cfg = node_config("load");
    let n = load(&cfg);
    assert!(cfg.pin_dir.join("snas_jobs").exists());
    drop(n);
    assert!(!cfg.pin_dir.exists());
}
