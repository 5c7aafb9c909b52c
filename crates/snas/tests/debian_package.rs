//! The `cargo deb` metadata of the `snas` package (`[package.metadata.deb]` in its Cargo.toml)
//! names files that exist: every asset (the binary aside, which the build makes), both systemd
//! units, and the documentation the units point at. Building the .deb needs cargo-deb, which
//! CI does not install (minutes of compiling for a packaging check); this test keeps the
//! metadata true between releases.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deb() -> toml::Value {
    let text = std::fs::read_to_string(crate_dir().join("Cargo.toml")).unwrap();
    let v: toml::Value = toml::from_str(&text).unwrap();
    v["package"]["metadata"]["deb"].clone()
}

#[test]
fn every_asset_of_the_debian_package_exists() {
    let d = deb();
    let assets = d["assets"].as_array().unwrap();
    let mut targets = Vec::new();
    for a in assets {
        let a = a.as_array().unwrap();
        let (src, dst) = (a[0].as_str().unwrap(), a[1].as_str().unwrap());
        targets.push(dst.to_owned());
        if src.starts_with("target/") {
            continue;
        }
        assert!(crate_dir().join(src).is_file(), "asset {src} is missing");
    }
    for u in d["systemd-units"].as_array().unwrap() {
        let dir = crate_dir().join(u["unit-scripts"].as_str().unwrap());
        let unit = dir.join(format!("{}.service", u["unit-name"].as_str().unwrap()));
        assert!(unit.is_file(), "{} is missing", unit.display());
        // The unit's ExecStart and Documentation name files the package installs.
        let text = std::fs::read_to_string(&unit).unwrap();
        assert!(
            text.contains("ExecStart=/usr/bin/snas "),
            "{}",
            unit.display()
        );
        for doc in text
            .lines()
            .filter_map(|l| l.strip_prefix("Documentation=file:///"))
        {
            let (dir, file) = doc.rsplit_once('/').unwrap();
            assert!(
                targets.iter().any(|t| t == &format!("{dir}/") || t == doc)
                    && assets.iter().any(|a| a[0]
                        .as_str()
                        .is_some_and(|s| Path::new(s).file_name().is_some_and(|n| n == file))),
                "{}: {doc} is not installed",
                unit.display()
            );
        }
    }
    assert!(
        targets.iter().any(|t| t == "usr/bin/"),
        "no binary in the package"
    );
}
