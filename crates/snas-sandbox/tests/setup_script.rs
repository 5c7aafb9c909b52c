//! `scripts/setup.sh` puts Debian's `bookworm-backports` suite (where runsc >= 20240729 comes
//! from) into apt's sources: on the mirror and with the keyring apt already uses, in the format
//! of the sources it copies (deb822 or one-line), once. Run against copies of apt's
//! configuration directory (`SNAS_SETUP_APT_DIR`, `--backports-source-only`); needs no root.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/setup.sh")
}

/// An apt directory with the given files; returns it.
fn apt_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("sources.list.d")).unwrap();
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    d
}

/// Runs the script's backports step; (success, stdout = the file carrying the suite, stderr).
fn ensure(dir: &Path) -> (bool, String, String) {
    let o = Command::new("bash")
        .arg(script())
        .arg("--backports-source-only")
        .env("SNAS_SETUP_APT_DIR", dir)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("sources.list.d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

const DEB822: &str = "Types: deb\n\
# http://snapshot.debian.org/archive/debian/20250520T000000Z\n\
URIs: http://deb.debian.org/debian\n\
Suites: bookworm bookworm-updates\n\
Components: main\n\
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\
\n\
Types: deb\n\
URIs: http://deb.debian.org/debian-security\n\
Suites: bookworm-security\n\
Components: main\n\
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";

#[test]
fn deb822_sources_get_a_deb822_backports_entry_on_the_same_mirror_once() {
    let d = apt_dir(&[("sources.list.d/debian.sources", DEB822)]);
    let (ok, file, err) = ensure(d.path());
    assert!(ok, "{err}");
    let ours = d
        .path()
        .join("sources.list.d/snas-bookworm-backports.sources");
    assert_eq!(file, ours.display().to_string());
    let text = std::fs::read_to_string(&ours).unwrap();
    for line in [
        "Types: deb",
        "URIs: http://deb.debian.org/debian",
        "Suites: bookworm-backports",
        "Components: main",
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
    }
    // A second run finds the suite and writes nothing new.
    let before = listing(d.path());
    let (ok, again, err) = ensure(d.path());
    assert!(ok, "{err}");
    assert_eq!(again, file);
    assert_eq!(listing(d.path()), before);
    assert_eq!(std::fs::read_to_string(&ours).unwrap(), text);
}

#[test]
fn one_line_sources_get_a_one_line_entry_with_the_same_options() {
    let d = apt_dir(&[(
        "sources.list",
        "# deb cdrom:[Debian 12]/ bookworm main\n\
         deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://ftp.de.debian.org/debian/ bookworm main contrib\n\
         deb http://security.debian.org/debian-security bookworm-security main\n",
    )]);
    let (ok, file, err) = ensure(d.path());
    assert!(ok, "{err}");
    let ours = d.path().join("sources.list.d/snas-bookworm-backports.list");
    assert_eq!(file, ours.display().to_string());
    let text = std::fs::read_to_string(&ours).unwrap();
    assert!(
        text.lines().any(|l| l
            == "deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://ftp.de.debian.org/debian/ bookworm-backports main"),
        "{text}"
    );
    let before = listing(d.path());
    assert!(ensure(d.path()).0);
    assert_eq!(listing(d.path()), before);
}

#[test]
fn a_backports_suite_configured_by_someone_else_is_left_as_it_is() {
    let one_line = apt_dir(&[(
        "sources.list",
        "deb http://ftp.fr.debian.org/debian bookworm main\n\
         deb http://ftp.fr.debian.org/debian bookworm-backports main\n",
    )]);
    let (ok, file, err) = ensure(one_line.path());
    assert!(ok, "{err}");
    assert_eq!(
        file,
        one_line.path().join("sources.list").display().to_string()
    );
    assert!(listing(one_line.path()).is_empty());

    // deb822 with a key block embedded in Signed-By (continuation lines).
    let deb822 = apt_dir(&[(
        "sources.list.d/mirror.sources",
        "Types: deb deb-src\nURIs: http://mirror.example/debian\n\
         Suites: bookworm bookworm-updates bookworm-backports\nComponents: main\n\
         Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n -----END PGP PUBLIC KEY BLOCK-----\n",
    )]);
    let (ok, _, err) = ensure(deb822.path());
    assert!(ok, "{err}");
    assert_eq!(listing(deb822.path()), vec!["mirror.sources".to_owned()]);
}

#[test]
fn a_disabled_or_commented_backports_entry_does_not_count() {
    let d = apt_dir(&[
        (
            "sources.list",
            "deb http://ftp.fr.debian.org/debian bookworm main\n\
             # deb http://ftp.fr.debian.org/debian bookworm-backports main\n",
        ),
        (
            "sources.list.d/old.sources",
            "Types: deb\nURIs: http://ftp.fr.debian.org/debian\nSuites: bookworm-backports\n\
             Components: main\nEnabled: no\n",
        ),
    ]);
    let (ok, file, err) = ensure(d.path());
    assert!(ok, "{err}");
    assert!(file.ends_with("snas-bookworm-backports.list"), "{file}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("deb http://ftp.fr.debian.org/debian bookworm-backports main"),
        "{text}"
    );
}

#[test]
fn without_a_bookworm_source_the_script_fails_and_says_what_to_add() {
    let d = apt_dir(&[(
        "sources.list",
        "deb http://ftp.fr.debian.org/debian trixie main\n",
    )]);
    let (ok, _, err) = ensure(d.path());
    assert!(!ok);
    assert!(err.contains("no apt source for Debian 'bookworm'"), "{err}");
    assert!(err.contains("bookworm-backports main"), "{err}");
    assert!(listing(d.path()).is_empty());
}
