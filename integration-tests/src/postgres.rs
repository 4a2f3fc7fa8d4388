//! A private PostgreSQL server for one test: a fresh cluster in a temporary
//! directory (`initdb`), listening on 127.0.0.1 on a free port with password
//! authentication (SCRAM) for the user [`USER`], stopped and removed when dropped.
//!
//! It needs PostgreSQL's server programs (Debian: `apt-get install postgresql`,
//! which `.ci/run` does): the newest `/usr/lib/postgresql/*/bin`, or the directory
//! in `CORRAL_PG_BINDIR`. The server cannot run as root; as root, it runs as the
//! `postgres` user (made by Debian's package), else `nobody`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The superuser of the test cluster.
pub const USER: &str = "corral";
/// Its password.
pub const PASSWORD: &str = "pg-pw-41d7c0e9";

/// A running test server.
#[derive(Debug)]
pub struct Postgres {
    child: Option<Child>,
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    /// `-c` settings beyond the defaults (TLS).
    settings: Vec<String>,
}

/// PostgreSQL's programs: `CORRAL_PG_BINDIR`, else the newest installed major.
pub fn bindir() -> PathBuf {
    if let Some(d) = std::env::var_os("CORRAL_PG_BINDIR") {
        return PathBuf::from(d);
    }
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((major, bin))
        })
        .collect();
    majors.sort();
    match majors.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "these tests need a PostgreSQL server: no /usr/lib/postgresql/*/bin/postgres \
             (apt-get install postgresql, as .ci/run does, or set CORRAL_PG_BINDIR)"
        ),
    }
}

/// Who the server runs as: ourselves, or (as root) `postgres`, else `nobody`.
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    for name in [c"postgres", c"nobody"] {
        // SAFETY: a NUL-terminated name; the result is read at once, before any
        // other getpw* call of this thread.
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        if !pw.is_null() {
            // SAFETY: non-null, as getpwnam returns it.
            let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
            return Some((uid, gid));
        }
    }
    panic!("running as root, and neither a postgres nor a nobody user exists to run PostgreSQL");
}

fn chown(path: &Path, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown for PostgreSQL");
    }
}

fn as_user(cmd: &mut Command, user: Option<(u32, u32)>) -> &mut Command {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Postgres {
    /// Make a cluster and start its server; waits until it accepts connections.
    pub fn start() -> Postgres {
        Postgres::start_with(None)
    }

    /// [`Postgres::start`], also serving TLS with `cert` and `key` (PEM) beside
    /// plain connections.
    pub fn start_tls(cert: &str, key: &str) -> Postgres {
        Postgres::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Postgres {
        let bin = bindir();
        let user = server_user();
        let dir = crate::open_tempdir();
        let data = dir.path().join("data");
        let sockets = dir.path().join("sockets");
        for d in [&data, &sockets] {
            std::fs::create_dir(d).unwrap();
            chown(d, user);
        }
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        chown(&pwfile, user);
        let out = as_user(&mut Command::new(bin.join("initdb")), user)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                USER,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("--no-sync")
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut settings = Vec::new();
        if let Some((cert, key)) = tls {
            for (name, pem, mode) in [("server.crt", cert, 0o644), ("server.key", key, 0o600)] {
                let path = data.join(name);
                std::fs::write(&path, pem).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
                chown(&path, user);
            }
            settings = vec![
                "ssl=on".into(),
                "ssl_cert_file=server.crt".into(),
                "ssl_key_file=server.key".into(),
            ];
        }
        let mut pg = Postgres {
            child: None,
            dir,
            bin,
            user,
            port: 0,
            settings,
        };
        let mut last = String::new();
        for _ in 0..5 {
            pg.port = free_port();
            match pg.serve() {
                Ok(()) => return pg,
                // Most likely the port was taken meanwhile: another one.
                Err(e) => last = e,
            }
        }
        panic!("PostgreSQL did not start: {last}\n{}", pg.log());
    }

    /// Start the server on the cluster and port; Err if it exits first.
    fn serve(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let mut child = as_user(&mut Command::new(self.bin.join("postgres")), self.user)
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path().join("sockets"))
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=on"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("postgres exited: {status}"));
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "PostgreSQL did not accept connections within 30 s:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop the server (fast shutdown: its clients are disconnected); the cluster
    /// stays for [`Postgres::restart`].
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Fast shutdown (SIGINT) of the server we started, by its pid; killed if it
        // has not finished in 10 s.
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: signalling our own child, which we have not reaped.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Start the stopped server again, on the same port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        if let Err(e) = self.serve() {
            panic!("PostgreSQL did not start again: {e}\n{}", self.log());
        }
    }

    /// The connection string of database `db`, without the password.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// The store backend for database `db`, with the password.
    pub fn store(&self, db: &str) -> corral::StoreBackend {
        corral::StoreBackend::Postgres(corral::PostgresStore {
            url: self.url(db),
            password: Some(corral_protocol::Secret(PASSWORD.into())),
            ca_file: None,
        })
    }

    /// Run `sql` in database `db` with psql; its output rows, unaligned.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                "-d",
                db,
            ])
            .args(["-c", sql])
            .env("PGPASSWORD", PASSWORD)
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A new, empty database.
    pub fn create_database(&self, db: &str) {
        self.psql("postgres", &format!("CREATE DATABASE {db}"));
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
