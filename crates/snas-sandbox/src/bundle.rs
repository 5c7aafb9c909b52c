//! The OCI bundle runsc starts: `config.json` plus a root filesystem skeleton and the
//! generated `/etc` files.
//!
//! Owns the shape of every sandbox: read-only root, tmpfs `/tmp`, bind mounts of the host's
//! `/usr` and `/etc/ld.so.cache` (read-only, nosuid, nodev), generated `/etc/resolv.conf`,
//! `/etc/hosts`, `/etc/passwd` and `/etc/group`, an optional host folder at `/app`, a workload
//! user that is not root, no capabilities, `noNewPrivileges`, the job's network namespace by
//! path plus new pid, ipc, uts and mount namespaces, `cgroupsPath` and `linux.resources`.
//!
//! [`oci_config`] is pure (a function of [`BundleSpec`]); [`write_bundle`] lays the files out
//! in a directory the caller owns and removes.
//!
//! # The shared skeleton
//! The host-`/usr` root ([`Rootfs::HostUsr`]) is the same empty skeleton for every sandbox
//! (mount points, four symlinks, empty files to bind over), and the sandbox sees it read-only.
//! [`ensure_host_usr_skeleton`] makes it once per state directory ([`HOST_USR_SKELETON`]) and
//! every run reuses it, so that a run creates and removes three directories instead of
//! thirteen: on a host whose `/run` is not tmpfs (the development machines: ext4, where a
//! `rmdir` costs 1–4 ms under load) that was most of the launcher's own share of a cold
//! start. It is made in a temporary sibling and renamed into place, so concurrent launchers
//! never see half of one; one that is incomplete is replaced. It stays until its state
//! directory is removed (`snas testbed down`; nothing per run is left in it).
//!
//! # Limits
//! - With `--rootfs DIR` the directory is used as it is (read-only); it must contain the
//!   mount points `/etc`, `/tmp`, `/proc` and, with `--app`, `/app`, and `/etc/resolv.conf`,
//!   `/etc/hosts`, `/etc/passwd`, `/etc/group` as files to bind over.

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::limits::{Limits, CPU_PERIOD};

/// Errors writing a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A file or directory of the bundle could not be written.
    #[error("writing bundle {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A path given by the user is unusable.
    #[error("{what} {path}: {reason}")]
    BadPath {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// Where the root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rootfs {
    /// Empty directories plus `bin`, `lib`, `lib64`, `sbin` → `usr/*`, with the host's `/usr`
    /// bound read-only: enough for `python3` and its standard library.
    HostUsr,
    /// A directory image used read-only as it is.
    Dir(PathBuf),
}

/// Everything that decides the sandbox's `config.json`.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    /// argv of the workload; `args[0]` is looked up by runsc in the sandbox's `PATH`.
    pub args: Vec<String>,
    /// Environment (`KEY=VALUE`); `PATH`, `HOME` and `LANG` are added when absent.
    pub env: Vec<String>,
    /// Working directory inside the sandbox.
    pub cwd: String,
    /// Workload user and group (default 65534, "nobody").
    pub uid: u32,
    /// Workload group.
    pub gid: u32,
    /// The sandbox's host name.
    pub hostname: String,
    /// Root filesystem.
    pub rootfs: Rootfs,
    /// Host folder bound at `/app` (read-write unless `app_readonly`).
    pub app_dir: Option<PathBuf>,
    /// Bind `/app` read-only.
    pub app_readonly: bool,
    /// Name servers for `/etc/resolv.conf` (the job's DNS stub, i.e. its gateway).
    pub nameservers: Vec<Ipv4Addr>,
    /// Network namespace file the sandbox joins (`--network=sandbox` takes its interfaces).
    pub netns: PathBuf,
    /// cgroup path handed to runsc (absolute, e.g. `/snas-<id>`).
    pub cgroups_path: String,
    /// Resource limits.
    pub limits: Limits,
    /// Size of the tmpfs at `/tmp`.
    pub tmp_size_mib: u32,
}

impl BundleSpec {
    /// A spec with the defaults (user nobody, cwd `/tmp`, host `/usr` root, 64 MiB `/tmp`).
    pub fn new(args: Vec<String>, netns: PathBuf, cgroups_path: String) -> BundleSpec {
        BundleSpec {
            args,
            env: Vec::new(),
            cwd: "/tmp".into(),
            uid: 65534,
            gid: 65534,
            hostname: "sandbox".into(),
            rootfs: Rootfs::HostUsr,
            app_dir: None,
            app_readonly: false,
            nameservers: Vec::new(),
            netns,
            cgroups_path,
            limits: Limits::default(),
            tmp_size_mib: 64,
        }
    }
}

fn ro_bind(dest: &str, src: &Path) -> Value {
    json!({"destination": dest, "type": "bind", "source": src,
           "options": ["rbind", "ro", "nosuid", "nodev"]})
}

/// The `config.json` for `spec`, with the generated `/etc` files under `etc_dir` and the root
/// at `rootfs_dir` (for [`Rootfs::HostUsr`]).
pub fn oci_config(spec: &BundleSpec, rootfs_dir: &Path, etc_dir: &Path) -> Value {
    let mut env = spec.env.clone();
    for (k, v) in [
        ("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
        ("HOME", "/tmp"),
        ("LANG", "C.UTF-8"),
    ] {
        if !env.iter().any(|e| e.starts_with(&format!("{k}="))) {
            env.push(format!("{k}={v}"));
        }
    }
    let root = match &spec.rootfs {
        Rootfs::HostUsr => rootfs_dir.to_path_buf(),
        Rootfs::Dir(d) => d.clone(),
    };
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "mode=1777", format!("size={}m", spec.tmp_size_mib)]}),
    ];
    if spec.rootfs == Rootfs::HostUsr {
        mounts.push(ro_bind("/usr", Path::new("/usr")));
        mounts.push(ro_bind("/etc/ld.so.cache", Path::new("/etc/ld.so.cache")));
    }
    for f in ["resolv.conf", "hosts", "passwd", "group"] {
        mounts.push(ro_bind(&format!("/etc/{f}"), &etc_dir.join(f)));
    }
    if let Some(app) = &spec.app_dir {
        let mut opts = vec!["rbind", "nosuid", "nodev"];
        opts.push(if spec.app_readonly { "ro" } else { "rw" });
        mounts.push(json!({"destination": "/app", "type": "bind", "source": app, "options": opts}));
    }
    let quota_us = spec.limits.cpus.quota().as_micros() as u64;
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": spec.uid, "gid": spec.gid},
            "args": spec.args,
            "env": env,
            "cwd": spec.cwd,
            "capabilities": {"bounding": [], "effective": [], "inheritable": [],
                             "permitted": [], "ambient": []},
            "noNewPrivileges": true,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}]
        },
        "root": {"path": root, "readonly": true},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "network", "path": spec.netns},
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}
            ],
            "cgroupsPath": spec.cgroups_path,
            "resources": {
                "memory": {"limit": spec.limits.memory.0},
                "cpu": {"quota": quota_us, "period": CPU_PERIOD.as_micros() as u64},
                "pids": {"limit": spec.limits.pids}
            }
        }
    })
}

/// `/etc/resolv.conf` text.
pub fn resolv_conf(nameservers: &[Ipv4Addr]) -> String {
    let mut s = String::from("# generated by snas-sandbox\n");
    for ns in nameservers {
        s.push_str(&format!("nameserver {ns}\n"));
    }
    s.push_str("options edns0\n");
    s
}

/// `/etc/passwd` text: root (owns nothing inside), the workload user, nobody.
pub fn passwd(uid: u32, gid: u32) -> String {
    let mut s = String::from("root:x:0:0:root:/root:/usr/sbin/nologin\n");
    if uid != 65534 && uid != 0 {
        s.push_str(&format!(
            "sandbox:x:{uid}:{gid}:sandbox:/tmp:/usr/sbin/nologin\n"
        ));
    }
    s.push_str("nobody:x:65534:65534:nobody:/tmp:/usr/sbin/nologin\n");
    s
}

/// `/etc/group` text.
pub fn group(gid: u32) -> String {
    let mut s = String::from("root:x:0:\n");
    if gid != 65534 && gid != 0 {
        s.push_str(&format!("sandbox:x:{gid}:\n"));
    }
    s.push_str("nogroup:x:65534:\n");
    s
}

/// `/etc/hosts` text.
pub fn hosts(hostname: &str) -> String {
    format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.1.1\t{hostname}\n")
}

/// Name of the shared host-`/usr` root skeleton inside a launcher's state directory.
pub const HOST_USR_SKELETON: &str = ".rootfs-host-usr-v1";

const SKELETON_DIRS: [&str; 8] = ["usr", "etc", "tmp", "proc", "dev", "sys", "app", "root"];
const SKELETON_LINKS: [(&str, &str); 4] = [
    ("bin", "usr/bin"),
    ("lib", "usr/lib"),
    ("lib64", "usr/lib64"),
    ("sbin", "usr/sbin"),
];
const SKELETON_FILES: [&str; 5] = ["ld.so.cache", "resolv.conf", "hosts", "passwd", "group"];

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> BundleError + '_ {
    move |source| BundleError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Lays the host-`/usr` root skeleton out in `root` (which must not exist yet).
fn make_skeleton(root: &Path) -> Result<(), BundleError> {
    for d in SKELETON_DIRS {
        let p = root.join(d);
        std::fs::create_dir_all(&p).map_err(write_err(&p))?;
    }
    for (l, t) in SKELETON_LINKS {
        let p = root.join(l);
        std::os::unix::fs::symlink(t, &p).map_err(write_err(&p))?;
    }
    for f in SKELETON_FILES {
        let p = root.join("etc").join(f);
        std::fs::write(&p, b"").map_err(write_err(&p))?;
    }
    Ok(())
}

/// Whether `root` holds every entry of the skeleton, each of the right kind.
fn skeleton_complete(root: &Path) -> bool {
    let is = |p: PathBuf, want: fn(&std::fs::FileType) -> bool| {
        std::fs::symlink_metadata(p).is_ok_and(|m| want(&m.file_type()))
    };
    SKELETON_DIRS
        .iter()
        .all(|d| is(root.join(d), std::fs::FileType::is_dir))
        && SKELETON_LINKS.iter().all(|(l, t)| {
            std::fs::read_link(root.join(l)).is_ok_and(|target| target == Path::new(t))
        })
        && SKELETON_FILES
            .iter()
            .all(|f| is(root.join("etc").join(f), std::fs::FileType::is_file))
}

/// Makes sure `state_dir` holds the shared host-`/usr` root skeleton and returns its path
/// (see the module docs).
pub fn ensure_host_usr_skeleton(state_dir: &Path) -> Result<PathBuf, BundleError> {
    let root = state_dir.join(HOST_USR_SKELETON);
    if skeleton_complete(&root) {
        return Ok(root);
    }
    std::fs::create_dir_all(state_dir).map_err(write_err(state_dir))?;
    let tmp = state_dir.join(format!(
        "{HOST_USR_SKELETON}.tmp-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let made = make_skeleton(&tmp).and_then(|()| {
        if root.exists() && !skeleton_complete(&root) {
            // Incomplete (an older layout, or damaged): replace it. A run that uses it right
            // now keeps its open directory handles.
            let _ = std::fs::remove_dir_all(&root);
        }
        match std::fs::rename(&tmp, &root) {
            Ok(()) => Ok(()),
            // Another launcher got there first (rename onto a non-empty directory fails).
            Err(_) if skeleton_complete(&root) => Ok(()),
            Err(e) => Err(write_err(&root)(e)),
        }
    });
    let _ = std::fs::remove_dir_all(&tmp);
    made.map(|()| root)
}

/// Writes the bundle for `spec` into `dir` (which must exist and be empty): `config.json`,
/// `rootfs/` and `etc/`. Returns the path of `config.json`.
pub fn write_bundle(spec: &BundleSpec, dir: &Path) -> Result<PathBuf, BundleError> {
    let rootfs = dir.join("rootfs");
    if spec.rootfs == Rootfs::HostUsr {
        make_skeleton(&rootfs)?;
    }
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).map_err(write_err(&etc))?;
    write_bundle_files(spec, dir, &rootfs, &etc)
}

/// Writes a bundle that uses a shared host-`/usr` skeleton (from [`ensure_host_usr_skeleton`])
/// into `dir` (which must exist): `config.json` and the generated `/etc` files side by side,
/// nothing else. Returns the path of `config.json`.
pub fn write_bundle_shared(
    spec: &BundleSpec,
    dir: &Path,
    skeleton: &Path,
) -> Result<PathBuf, BundleError> {
    write_bundle_files(spec, dir, skeleton, dir)
}

fn write_bundle_files(
    spec: &BundleSpec,
    dir: &Path,
    rootfs: &Path,
    etc: &Path,
) -> Result<PathBuf, BundleError> {
    let w = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Write { path, source }
    };
    if let Some(app) = &spec.app_dir {
        if !app.is_absolute() || !app.is_dir() {
            return Err(BundleError::BadPath {
                what: "--app",
                path: app.clone(),
                reason: "not an absolute path of a directory".into(),
            });
        }
    }
    if let Rootfs::Dir(d) = &spec.rootfs {
        if !d.is_absolute() || !d.join("etc").is_dir() {
            return Err(BundleError::BadPath {
                what: "--rootfs",
                path: d.clone(),
                reason: "not an absolute path, or has no etc/ to bind resolv.conf into".into(),
            });
        }
    }
    for (name, text) in [
        ("resolv.conf", resolv_conf(&spec.nameservers)),
        ("hosts", hosts(&spec.hostname)),
        ("passwd", passwd(spec.uid, spec.gid)),
        ("group", group(spec.gid)),
    ] {
        let p = etc.join(name);
        std::fs::write(&p, text).map_err(w(&p))?;
    }
    let config = dir.join("config.json");
    let text = oci_config(spec, rootfs, etc).to_string();
    std::fs::write(&config, text).map_err(w(&config))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BundleSpec {
        let mut s = BundleSpec::new(
            vec!["python3".into(), "-c".into(), "pass".into()],
            "/run/netns/job".into(),
            "/snas-t1".into(),
        );
        s.nameservers = vec![Ipv4Addr::new(192, 0, 2, 1)];
        s
    }

    #[test]
    fn config_is_read_only_unprivileged_and_in_the_job_netns() {
        let c = oci_config(&spec(), Path::new("/b/rootfs"), Path::new("/b/etc"));
        assert_eq!(c["root"]["readonly"], true);
        assert_eq!(c["process"]["user"]["uid"], 65534);
        assert_eq!(c["process"]["noNewPrivileges"], true);
        for set in [
            "bounding",
            "effective",
            "permitted",
            "ambient",
            "inheritable",
        ] {
            assert_eq!(c["process"]["capabilities"][set], json!([]));
        }
        let ns = &c["linux"]["namespaces"];
        assert_eq!(ns[0], json!({"type": "network", "path": "/run/netns/job"}));
        let types: Vec<_> = ns
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["network", "pid", "ipc", "uts", "mount"]);
    }

    #[test]
    fn config_carries_limits_and_cgroup_path() {
        let mut s = spec();
        s.limits.memory = crate::limits::Bytes(256 << 20);
        s.limits.cpus = crate::limits::MilliCpus(500);
        s.limits.pids = 128;
        let c = oci_config(&s, Path::new("/b/rootfs"), Path::new("/b/etc"));
        let r = &c["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], 256u64 << 20);
        assert_eq!(r["cpu"]["quota"], 50_000);
        assert_eq!(r["cpu"]["period"], 100_000);
        assert_eq!(r["pids"]["limit"], 128);
        assert_eq!(c["linux"]["cgroupsPath"], "/snas-t1");
    }

    #[test]
    fn host_usr_is_bound_read_only_and_tmp_is_tmpfs() {
        let c = oci_config(&spec(), Path::new("/b/rootfs"), Path::new("/b/etc"));
        let mounts = c["mounts"].as_array().unwrap();
        let usr = mounts.iter().find(|m| m["destination"] == "/usr").unwrap();
        let opts: Vec<_> = usr["options"].as_array().unwrap().iter().collect();
        assert!(opts.contains(&&json!("ro")) && opts.contains(&&json!("nosuid")));
        let tmp = mounts.iter().find(|m| m["destination"] == "/tmp").unwrap();
        assert_eq!(tmp["type"], "tmpfs");
        let resolv = mounts
            .iter()
            .find(|m| m["destination"] == "/etc/resolv.conf")
            .unwrap();
        assert_eq!(resolv["source"], "/b/etc/resolv.conf");
        assert!(!mounts.iter().any(|m| m["destination"] == "/app"));
    }

    #[test]
    fn custom_rootfs_is_used_as_is_without_host_usr() {
        let mut s = spec();
        s.rootfs = Rootfs::Dir("/images/py".into());
        s.app_dir = Some("/srv/app".into());
        let c = oci_config(&s, Path::new("/b/rootfs"), Path::new("/b/etc"));
        assert_eq!(c["root"]["path"], "/images/py");
        let mounts = c["mounts"].as_array().unwrap();
        assert!(!mounts.iter().any(|m| m["destination"] == "/usr"));
        let app = mounts.iter().find(|m| m["destination"] == "/app").unwrap();
        assert_eq!(app["source"], "/srv/app");
    }

    #[test]
    fn the_shared_skeleton_is_made_once_reused_and_repaired() {
        let state = std::env::temp_dir().join(format!("snas-skel-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let root = ensure_host_usr_skeleton(&state).unwrap();
        assert_eq!(root, state.join(HOST_USR_SKELETON));
        assert!(skeleton_complete(&root));
        assert_eq!(
            std::fs::read_link(root.join("lib64")).unwrap(),
            Path::new("usr/lib64")
        );
        // Reused as it is: a marker inside survives a second call.
        std::fs::write(root.join("tmp/marker"), b"x").unwrap();
        ensure_host_usr_skeleton(&state).unwrap();
        assert!(root.join("tmp/marker").exists());
        // Damaged: replaced by a complete one, and no temporary sibling is left.
        std::fs::remove_file(root.join("etc/hosts")).unwrap();
        ensure_host_usr_skeleton(&state).unwrap();
        assert!(skeleton_complete(&root));
        assert!(!root.join("tmp/marker").exists());
        let names: Vec<String> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![HOST_USR_SKELETON.to_owned()]);
        let _ = std::fs::remove_dir_all(&state);
    }

    #[test]
    fn a_shared_bundle_is_config_and_etc_files_only_pointing_at_the_skeleton() {
        let dir = std::env::temp_dir().join(format!("snas-shared-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let skel = Path::new("/run/x/.rootfs-host-usr-v1");
        let config = write_bundle_shared(&spec(), &dir, skel).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["config.json", "group", "hosts", "passwd", "resolv.conf"]
        );
        let c: Value = serde_json::from_str(&std::fs::read_to_string(config).unwrap()).unwrap();
        assert_eq!(c["root"]["path"], skel.display().to_string());
        assert_eq!(c["root"]["readonly"], true);
        let resolv = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/etc/resolv.conf")
            .unwrap();
        assert_eq!(
            resolv["source"],
            dir.join("resolv.conf").display().to_string()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn resolv_conf_names_the_job_resolver_only() {
        let r = resolv_conf(&[Ipv4Addr::new(198, 51, 100, 1)]);
        let ns: Vec<_> = r.lines().filter(|l| l.starts_with("nameserver")).collect();
        assert_eq!(ns, ["nameserver 198.51.100.1"]);
    }

    #[test]
    fn env_gets_path_unless_given() {
        let mut s = spec();
        s.env = vec!["PATH=/opt/bin".into()];
        let c = oci_config(&s, Path::new("/r"), Path::new("/e"));
        let env: Vec<_> = c["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(env.iter().filter(|e| e.starts_with("PATH=")).count(), 1);
        assert!(env.contains(&"PATH=/opt/bin".to_owned()));
        assert!(env.contains(&"HOME=/tmp".to_owned()));
    }
}
