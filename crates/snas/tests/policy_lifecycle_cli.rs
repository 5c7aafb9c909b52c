//! Black-box tests of `snas policy sign --update-of` and `snas policy revoke` (unprivileged,
//! temp dirs only).

use assert_cmd::Command;
use std::fs;
use std::path::PathBuf;
use tempfile::TempDir;

const POLICY: &str =
    "tenant = \"acme\"\njob = \"job-42\"\n\n[[egress]]\nhost = \"api.example.com:443\"\n";
const UPDATED: &str = "tenant = \"acme\"\njob = \"job-42\"\n\n[[egress]]\nhost = \"api.example.com:443\"\n\n[[egress]]\ncidr = \"203.0.113.0/24\"\nports = \"5432\"\n";

fn snas() -> Command {
    Command::cargo_bin("snas").expect("binary built")
}

struct Fx {
    dir: TempDir,
}

impl Fx {
    fn new() -> Fx {
        let f = Fx {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        f.write("policy.toml", POLICY);
        f.write("updated.toml", UPDATED);
        for kid in ["k1", "k2"] {
            snas()
                .args(["policy", "keygen", "--out"])
                .arg(f.path("keys"))
                .args(["--key-id", kid])
                .assert()
                .success();
        }
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, text).expect("write");
        p
    }

    fn sign(&self, kid: &str, extra: &[&str], file: &str) -> std::process::Output {
        snas()
            .args(["policy", "sign", "--key"])
            .arg(self.path(&format!("keys/{kid}.key")))
            .args(extra)
            .arg(self.path(file))
            .output()
            .expect("run")
    }

    fn sign_ok(&self, kid: &str, extra: &[&str], file: &str) -> String {
        let o = self.sign(kid, extra, file);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).expect("utf8").trim().to_owned()
    }

    fn claims(&self, token: &str) -> serde_json::Value {
        let p = self.write("t.jws", token);
        let o = snas()
            .args(["policy", "verify", "--trust"])
            .arg(self.path("keys"))
            .arg(p)
            .output()
            .expect("run");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).expect("json")
    }
}

#[test]
fn update_of_keeps_the_job_key_and_raises_the_serial_by_one() {
    let f = Fx::new();
    let old = f.sign_ok("k1", &[], "policy.toml");
    f.write("old.jws", &old);
    let old_file = f.path("old.jws");
    let new = f.sign_ok(
        "k1",
        &["--update-of", old_file.to_str().expect("path")],
        "updated.toml",
    );
    let (o, n) = (f.claims(&old), f.claims(&new));
    assert_eq!(o["jti"], n["jti"]);
    assert_eq!(o["serial"], 1);
    assert_eq!(n["serial"], 2);
    assert_eq!(n["egress"].as_array().map(Vec::len), Some(2));
    // The token itself works as the argument too, and a larger --serial is taken.
    let next = f.sign_ok(
        "k1",
        &["--update-of", &new, "--serial", "9"],
        "updated.toml",
    );
    assert_eq!(f.claims(&next)["serial"], 9);
    assert_eq!(f.claims(&next)["jti"], o["jti"]);
}

#[test]
fn update_of_refuses_a_smaller_or_equal_serial_and_another_job() {
    let f = Fx::new();
    let old = f.sign_ok("k1", &["--serial", "5"], "policy.toml");
    for s in ["5", "4"] {
        let o = f.sign("k1", &["--update-of", &old, "--serial", s], "updated.toml");
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("--serial") && err.contains("not above 5"),
            "{err}"
        );
    }
    f.write("other.toml", &POLICY.replace("job-42", "job-43"));
    let o = f.sign("k1", &["--update-of", &old], "other.toml");
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("job: `job-43` is not `job-42`"), "{err}");
    f.write("tenant.toml", &POLICY.replace("acme", "globex"));
    let o = f.sign("k1", &["--update-of", &old], "tenant.toml");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tenant: `globex` is not `acme`"), "{err}");
}

#[test]
fn update_of_checks_the_old_signature_with_trust_and_notes_a_foreign_key_without() {
    let f = Fx::new();
    let old = f.sign_ok("k2", &[], "policy.toml");
    // Signed with k2, updated with k1 (rotation): without --trust, a note says it was not checked.
    let o = f.sign("k1", &["--update-of", &old], "updated.toml");
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not checked"));
    let trust = f.path("keys/k2.pub");
    let trust = trust.to_str().expect("path");
    let o = f.sign(
        "k1",
        &["--update-of", &old, "--trust", trust],
        "updated.toml",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stderr.is_empty());
    // A tampered token does not verify.
    let mut parts: Vec<&str> = old.split('.').collect();
    let forged_sig = "A".repeat(parts[2].len());
    parts[2] = &forged_sig;
    let forged = parts.join(".");
    let o = f.sign(
        "k1",
        &["--update-of", &forged, "--trust", trust],
        "updated.toml",
    );
    assert_eq!(o.status.code(), Some(2));
    // Own key id with a bad signature is refused even without --trust.
    let own = f.sign_ok("k1", &[], "policy.toml");
    let mut parts: Vec<&str> = own.split('.').collect();
    let forged_sig = "A".repeat(parts[2].len());
    parts[2] = &forged_sig;
    let o = f.sign("k1", &["--update-of", &parts.join(".")], "updated.toml");
    assert_eq!(o.status.code(), Some(2));
    // Garbage is not a token.
    let o = f.sign("k1", &["--update-of", "a.b.c"], "updated.toml");
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn revoke_prints_a_revocation_of_every_serial_or_only_the_tokens() {
    let f = Fx::new();
    let token = f.sign_ok("k1", &["--serial", "3"], "policy.toml");
    let run = |extra: &[&str]| {
        let o = snas()
            .args(["policy", "revoke", "--key"])
            .arg(f.path("keys/k1.key"))
            .args(extra)
            .arg(&token)
            .output()
            .expect("run");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).expect("utf8").trim().to_owned()
    };
    let bundle = snas_policy::bundle_fs::load_trust_bundle(&f.path("keys")).expect("trust bundle");
    let claims = f.claims(&token);
    let all = run(&[]);
    let v = snas_policy::revocation::verify_revocation(&all, &bundle, std::time::SystemTime::now())
        .expect("verifies");
    assert_eq!(v.claims().revokes, claims["jti"].as_str().expect("jti"));
    assert_eq!(Some(v.claims().exp), claims["exp"].as_u64());
    assert_eq!(
        (v.claims().serial_min, v.claims().serial_max),
        (0, u32::MAX)
    );
    let one = run(&["--serial-only"]);
    let v = snas_policy::revocation::verify_revocation(&one, &bundle, std::time::SystemTime::now())
        .expect("verifies");
    assert_eq!((v.claims().serial_min, v.claims().serial_max), (3, 3));
}
