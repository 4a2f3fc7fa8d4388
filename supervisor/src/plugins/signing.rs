//! Plugin signatures: ed25519 over a digest of every file of a plugin directory.
//!
//! `plugin.sig` (TOML) beside `plugin.toml` lists each file with its SHA-256 and
//! carries the publisher's name, public key and signature:
//!
//! ```toml
//! publisher = "acme"
//! public_key = "<64 hex digits>"
//! signature = "<128 hex digits>"
//! [files]
//! "main.js" = "<sha256 hex>"
//! "plugin.toml" = "<sha256 hex>"
//! ```
//!
//! The signed message is `corral-plugin-signature-v1\n` followed by the publisher's
//! name and one `<sha256>  <path>` line per file, in path order: the name and every
//! file (path and content) are covered; adding, removing, renaming or changing a file
//! breaks it, and the verifier names the file. Every regular file below the
//! directory is covered except `plugin.sig` itself and `__pycache__` directories;
//! a symbolic link is refused (it could point anywhere).
//!
//! Trust is the operator's: `[publishers]` in the daemon's configuration maps names
//! to public keys. A plugin whose signature verifies with its publisher's trusted
//! key has that publisher (policy routes can match `publisher` and `signed`); an
//! unsigned plugin has none; a plugin with a `plugin.sig` that does not verify is
//! refused.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The signature file's name.
pub const SIG_FILE: &str = "plugin.sig";

/// The largest signature file read: a publisher, a key, a signature and a line of
/// about 100 bytes per file. A plugin with vendored packages has thousands of
/// files (numpy alone about 1,000); an archive may hold 10,000 entries
/// (`install::MAX_ENTRIES`), whose lines this holds with room to spare.
const MAX_SIG_FILE: u64 = 4 << 20;
const DOMAIN: &str = "corral-plugin-signature-v1\n";

/// Why a plugin's signature was refused, or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: corral_files::ReadError,
    },
    #[error("plugin.sig: {0}")]
    Malformed(String),
    #[error("{path}: a symbolic link; signed plugins may not contain links")]
    Symlink { path: String },
    #[error("tampered: {0}")]
    Tampered(String),
    #[error("publisher {publisher:?} is not trusted: no key for it in [publishers]")]
    UnknownPublisher { publisher: String },
    #[error("signed with key {got} but the trusted key of publisher {publisher:?} is {want}")]
    WrongKey {
        publisher: String,
        got: String,
        want: String,
    },
    #[error("bad key: {0}")]
    BadKey(String),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SigFile {
    publisher: String,
    public_key: String,
    signature: String,
    files: BTreeMap<String, String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SignError + '_ {
    move |source| SignError::Io {
        path: path.to_owned(),
        source,
    }
}

/// SHA-256 of every covered file, by path relative to `dir` (`/`-separated).
pub fn file_digests(dir: &Path) -> Result<BTreeMap<String, String>, SignError> {
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) -> Result<(), SignError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        let kind = entry.file_type().map_err(io(&path))?;
        if kind.is_symlink() {
            return Err(SignError::Symlink { path: rel });
        }
        if kind.is_dir() {
            if entry.file_name() != "__pycache__" {
                walk(root, &path, out)?;
            }
        } else if rel != SIG_FILE {
            let sum = sha256_file(&path).map_err(|source| SignError::File {
                path: path.clone(),
                source,
            })?;
            out.insert(rel, sum);
        }
    }
    Ok(())
}

/// SHA-256 (hex) of the regular file at `path`, read in pieces: a plugin's file is
/// its author's, so it is never followed through a link, never waited on (a FIFO is
/// refused) and never held whole in memory.
pub(crate) fn sha256_file(path: &Path) -> Result<String, corral_files::ReadError> {
    let (mut file, _) = corral_files::open_regular_here(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut file, &mut h)?;
    Ok(hex(&h.finalize()))
}

fn message(publisher: &str, files: &BTreeMap<String, String>) -> Vec<u8> {
    let mut m = format!("{DOMAIN}{publisher}\n");
    for (path, sum) in files {
        m.push_str(&format!("{sum}  {path}\n"));
    }
    m.into_bytes()
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex<const N: usize>(s: &str, what: &str) -> Result<[u8; N], SignError> {
    let bad = || SignError::Malformed(format!("{what} must be {} hex digits", N * 2));
    if s.len() != N * 2 {
        return Err(bad());
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// A new signing key from the operating system's random source: (secret, public),
/// both hex.
pub fn keygen() -> Result<(String, String), SignError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| SignError::BadKey(format!("no randomness: {e}")))?;
    let key = SigningKey::from_bytes(&seed);
    Ok((hex(&seed), hex(key.verifying_key().as_bytes())))
}

/// The public key (hex) of a secret key (hex).
pub fn public_of(secret_hex: &str) -> Result<String, SignError> {
    let seed = unhex::<32>(secret_hex.trim(), "the secret key")?;
    Ok(hex(SigningKey::from_bytes(&seed)
        .verifying_key()
        .as_bytes()))
}

/// Sign `dir` as `publisher` with `secret_hex`; writes `plugin.sig`. Returns the
/// number of files covered.
pub fn sign(dir: &Path, publisher: &str, secret_hex: &str) -> Result<usize, SignError> {
    let seed = unhex::<32>(secret_hex.trim(), "the secret key")?;
    let key = SigningKey::from_bytes(&seed);
    let files = file_digests(dir)?;
    let sig = key.sign(&message(publisher, &files));
    let n = files.len();
    let text = toml::to_string(&SigFile {
        publisher: publisher.to_owned(),
        public_key: hex(key.verifying_key().as_bytes()),
        signature: hex(&sig.to_bytes()),
        files,
    })
    .map_err(|e| SignError::Malformed(e.to_string()))?;
    let path = dir.join(SIG_FILE);
    std::fs::write(
        &path,
        format!("# Corral plugin signature (corral plugin sign)\n{text}"),
    )
    .map_err(io(&path))?;
    Ok(n)
}

/// Verify `dir` against the trusted keys (publisher name -> public key hex).
/// `Ok(None)`: unsigned. `Ok(Some(publisher))`: verified.
pub fn verify(dir: &Path, trusted: &BTreeMap<String, String>) -> Result<Option<String>, SignError> {
    let path = dir.join(SIG_FILE);
    let text = match corral_files::read_regular_string(&path, MAX_SIG_FILE) {
        Ok(t) => t,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(source) => return Err(SignError::File { path, source }),
    };
    let sig: SigFile =
        toml::from_str(&text).map_err(|e| SignError::Malformed(e.message().to_owned()))?;
    let want = trusted
        .get(&sig.publisher)
        .ok_or_else(|| SignError::UnknownPublisher {
            publisher: sig.publisher.clone(),
        })?;
    if !want.eq_ignore_ascii_case(&sig.public_key) {
        return Err(SignError::WrongKey {
            publisher: sig.publisher.clone(),
            got: sig.public_key.clone(),
            want: want.clone(),
        });
    }
    let key = VerifyingKey::from_bytes(&unhex::<32>(&sig.public_key, "public_key")?)
        .map_err(|e| SignError::BadKey(e.to_string()))?;
    let signature = Signature::from_bytes(&unhex::<64>(&sig.signature, "signature")?);
    key.verify(&message(&sig.publisher, &sig.files), &signature)
        .map_err(|_| {
            SignError::Tampered(format!(
                "{SIG_FILE}: the signature does not match its file list"
            ))
        })?;
    let now = file_digests(dir)?;
    for (path, sum) in &sig.files {
        match now.get(path) {
            None => return Err(SignError::Tampered(format!("{path}: signed but missing"))),
            Some(s) if s != sum => {
                return Err(SignError::Tampered(format!(
                    "{path}: changed since signing"
                )));
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = now.keys().find(|p| !sig.files.contains_key(*p)) {
        return Err(SignError::Tampered(format!("{extra}: added after signing")));
    }
    Ok(Some(sig.publisher))
}
