//! A `corral serve` process for end-to-end tests: started in a directory with a
//! `corral.toml` written there, reached through its control socket and the CLI,
//! its stderr in `stderr.log`, killed by pid when dropped.

use corral_worker::services::{decode_list, encode_list};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The control socket, relative to the daemon's directory (configurations name
/// it with `socket = "run/control.sock"`).
pub const SOCKET: &str = "run/control.sock";

/// A running daemon.
#[derive(Debug)]
pub struct Served {
    pub child: std::process::Child,
    pub dir: PathBuf,
    /// Its control socket.
    pub socket: PathBuf,
}

impl Served {
    /// Write `config` to `dir/corral.toml` and run `corral serve` on it until its
    /// control socket exists (the configuration must say `socket = "run/control.sock"`).
    pub fn start(dir: &Path, config: &str) -> Served {
        std::fs::write(dir.join("corral.toml"), config).unwrap();
        let mut serve = std::process::Command::new(crate::built().corral());
        serve
            .args(["serve", "--log", "info", "--config"])
            .arg(dir.join("corral.toml"));
        Served::launch(dir, serve, &dir.join(SOCKET))
    }

    /// Run `serve` (a `corral serve` command line, however it is wrapped) with its
    /// stderr in `dir/stderr.log`, until `socket` exists.
    pub fn launch(dir: &Path, mut serve: std::process::Command, socket: &Path) -> Served {
        let _ = std::fs::remove_file(socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("stderr.log"))
            .unwrap();
        let mut child = serve.stderr(log).spawn().unwrap();
        let until = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "corral serve exited ({status}):\n{}",
                    std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < until, "daemon did not create its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Served {
            child,
            dir: dir.to_owned(),
            socket: socket.to_owned(),
        }
    }

    /// `corral <args> --socket <its socket>`.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(crate::built().corral())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .unwrap()
    }

    /// `corral call <id> host` with [operation, args...]: the answer list, or stderr.
    pub fn host(&self, id: &str, items: &[&[u8]]) -> Result<Vec<Vec<u8>>, String> {
        let input = self.dir.join("input.bin");
        let list: Vec<Vec<u8>> = items.iter().map(|i| i.to_vec()).collect();
        std::fs::write(&input, encode_list(&list)).unwrap();
        let out = self.cli(&["call", id, "host", "--input-file", input.to_str().unwrap()]);
        if out.status.success() {
            Ok(decode_list(&out.stdout).unwrap())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// The rest of the first stderr line that contains `marker`, once it is there.
    pub fn announced(&self, marker: &str) -> String {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(rest) = self
                .stderr()
                .lines()
                .find_map(|l| l.split_once(marker).map(|(_, r)| r.to_owned()))
            {
                return rest;
            }
            assert!(
                Instant::now() < until,
                "the daemon never said {marker:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The base URL of its remote call API (`https://127.0.0.1:<port>`), from its
    /// announcement (text or JSON log lines alike).
    pub fn remote_url(&self) -> String {
        let rest = self.announced("remote calls on ");
        let url = rest
            .split("/v1/call/")
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        assert!(
            url.starts_with("https://") || url.starts_with("http://"),
            "{rest}"
        );
        url
    }

    /// SIGKILL, and wait for it.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
