//! The supervisor's own limits are its own: a daemon out of file descriptors
//! refuses starts as its limit (`Overloaded`, with the reason), counts no crash,
//! marks no plugin failed and leaves no cgroup; the workers it has keep serving.

use crate::support::text;
use corral_integration_tests::{built, descendants, js_plugin, v1_cgroup, wait_gone};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The daemon's descriptor limit, soft and hard: room for its own and a few
/// workers' (each holds its socket and two output pipes).
const DAEMON_FILES: libc::rlim_t = 40;

/// Plugins configured: more than the limit leaves room for.
const PLUGINS: usize = 16;

fn cli(socket: &std::path::Path, args: &[&str]) -> Output {
    Command::new(built().corral())
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap()
}

/// The daemon, killed if the test ends early.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_daemon_out_of_descriptors_refuses_starts_as_its_own_limit_and_blames_no_plugin() {
    let dir = corral_integration_tests::open_tempdir();
    let plugins: Vec<_> = (0..PLUGINS)
        .map(|i| js_plugin(&format!("p{i:02}"), ""))
        .collect();
    let list: Vec<String> = plugins
        .iter()
        .map(|p| format!("{:?}", p.path().to_str().unwrap()))
        .collect();
    let config = dir.path().join("corral.toml");
    std::fs::write(
        &config,
        format!(
            "plugins = [{}]\nsocket = \"control.sock\"\ncache_dir = \"cache\"\n\
             state_dir = \"state\"\naudit = \"off\"\nwatch = false\n",
            list.join(", ")
        ),
    )
    .unwrap();
    let socket = dir.path().join("control.sock");
    let mut cmd = Command::new(built().corral());
    cmd.args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            let r = libc::rlimit {
                rlim_cur: DAEMON_FILES,
                rlim_max: DAEMON_FILES,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut daemon = Killed(cmd.spawn().unwrap());
    let daemon = &mut daemon.0;
    let pid = daemon.id();
    let until = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < until, "daemon did not create its socket");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Start plugins one by one until the daemon has no descriptors for the next.
    let mut started = Vec::new();
    let mut refused = None;
    for i in 0..PLUGINS {
        let id = format!("p{i:02}");
        let out = cli(&socket, &["call", &id, "echo", "--input", "hi"]);
        if out.status.success() {
            assert_eq!(text(&out.stdout), "hi");
            started.push(id);
            continue;
        }
        // 9: unavailable, as for a full queue: retry later, not the plugin's fault.
        assert_eq!(out.status.code(), Some(9), "{}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(
            err.contains(
                "is overloaded: the supervisor cannot start a worker now: the \
                          supervisor is out of file descriptors (EMFILE"
            ) && err.contains(&format!("its RLIMIT_NOFILE is {DAEMON_FILES}")),
            "{err}"
        );
        refused = Some(id);
        break;
    }
    let refused = refused.expect("a start past the descriptor limit is refused");
    assert!(!started.is_empty(), "the first plugins start");

    // More refusals than max_crashes (5): still the supervisor's limit, never failed.
    for _ in 0..7 {
        let out = cli(&socket, &["call", &refused, "echo", "--input", "hi"]);
        assert_eq!(out.status.code(), Some(9), "{}", text(&out.stderr));
    }
    let out = cli(&socket, &["list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for p in v.as_array().unwrap() {
        let id = p["id"].as_str().unwrap();
        let state = p["state"].as_str().unwrap();
        if started.iter().any(|s| s == id) {
            assert_eq!(state, "running", "{p}");
        } else {
            assert_eq!(state, "stopped", "no crash counted, not failed: {p}");
            assert_eq!(p["restarts"], 0, "{p}");
        }
        if id == refused {
            let e = p["last_error"].as_str().unwrap();
            assert!(e.contains("out of file descriptors (EMFILE"), "{e}");
        }
    }
    // No failed start left a group: the daemon's base holds one per live worker.
    // A start refused after its template forked (the pidfd could not be received)
    // had a child in its group: the group goes once that child has ended at its
    // socket's end of file, a moment later, so this waits (within 5 s) for it.
    let base = v1_cgroup(&pid.to_string(), "memory").join(format!("corral-{pid}"));
    let list_groups = || -> Vec<String> {
        std::fs::read_dir(&base)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let until = Instant::now() + Duration::from_secs(5);
    let mut groups = list_groups();
    while groups.len() != started.len() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
        groups = list_groups();
    }
    assert_eq!(groups.len(), started.len(), "{groups:?} for {started:?}");
    assert!(
        groups
            .iter()
            .all(|g| started.iter().any(|s| g.starts_with(&format!("{s}-")))),
        "{groups:?}"
    );
    // The workers it has keep serving, and status says where the limit is.
    for id in &started {
        let out = cli(&socket, &["call", id, "echo", "--input", "again"]);
        assert_eq!(text(&out.stdout), "again", "{}", text(&out.stderr));
    }
    let out = cli(&socket, &["status"]);
    let status = text(&out.stdout);
    assert!(
        status.contains(&format!("workers: {} live (no max_workers", started.len()))
            && status.contains(&format!("of {DAEMON_FILES}")),
        "{status}"
    );

    let workers = descendants(pid);
    assert!(cli(&socket, &["stop"]).status.success());
    let until = Instant::now() + Duration::from_secs(10);
    while daemon.try_wait().unwrap().is_none() {
        assert!(Instant::now() < until, "daemon did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    for w in workers {
        assert!(
            wait_gone(w, Duration::from_secs(5)),
            "worker {w} left running"
        );
    }
    assert!(!base.exists(), "the base group is removed at stop");
}
