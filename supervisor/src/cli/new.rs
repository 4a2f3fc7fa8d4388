//! `corral new <dir> --runtime R`: a complete, working plugin to start from, with
//! two functions, the `init` and `shutdown` hooks, a use of the store, a README, a
//! development policy and test cases that `corral test` passes at once. The
//! templates are the files under `supervisor/templates/`, compiled in.

use super::exit::{self, Failure, Outcome};
use super::output::print_json;
use clap::Args;
use std::path::{Path, PathBuf};

/// The runtimes `corral new` writes plugins for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NewRuntime {
    /// Rust, built for wasm32-wasip1 against the guest crate.
    Wasm,
    /// JavaScript (an ES module).
    Js,
    /// Python (a module).
    Python,
    /// Rust, built for the machine as a shared library, in a confined worker.
    Native,
}

/// The arguments of `corral new`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// Where to write it: a new or empty directory.
    dir: PathBuf,
    #[arg(long, value_enum)]
    runtime: NewRuntime,
    /// The plugin's id (default: the directory's name).
    #[arg(long)]
    id: Option<String>,
    /// The guest crate (`crates/guest` of Corral's source) a Rust plugin builds
    /// against (default: `CORRAL_GUEST`, else the one this corral was built from).
    #[arg(long, env = "CORRAL_GUEST")]
    guest: Option<PathBuf>,
    /// Print JSON instead of text (docs/json.md).
    #[arg(long)]
    pub(super) json: bool,
}

/// A template file: where it goes and its text.
type Template = (&'static str, &'static str);

const COMMON: &[Template] = &[
    (
        "README.md",
        include_str!("../../templates/common/README.md"),
    ),
    (
        "dev-policy.toml",
        include_str!("../../templates/common/dev-policy.toml"),
    ),
    (
        "tests/basics.toml",
        include_str!("../../templates/common/tests/basics.toml"),
    ),
    (
        "tests/config.toml",
        include_str!("../../templates/common/tests/config.toml"),
    ),
    (
        "tests/store.toml",
        include_str!("../../templates/common/tests/store.toml"),
    ),
];

const JS: &[Template] = &[
    (
        "plugin.toml",
        include_str!("../../templates/js/plugin.toml"),
    ),
    ("main.js", include_str!("../../templates/js/main.js")),
    (
        "tsconfig.json",
        include_str!("../../templates/js/tsconfig.json"),
    ),
    ("corral.d.ts", include_str!("../../../sdk/js/corral.d.ts")),
];

const PYTHON: &[Template] = &[
    (
        "plugin.toml",
        include_str!("../../templates/python/plugin.toml"),
    ),
    (
        "plugin.py",
        include_str!("../../templates/python/plugin.py"),
    ),
    (
        "test_plugin.py",
        include_str!("../../templates/python/test_plugin.py"),
    ),
];

/// The Rust source both Rust runtimes share (corral-guest exports either ABI).
const RUST: &[Template] = &[
    (
        "src/lib.rs",
        include_str!("../../templates/rust/src/lib.rs"),
    ),
    (".gitignore", include_str!("../../templates/rust/gitignore")),
];

const WASM: &[Template] = &[
    (
        "plugin.toml",
        include_str!("../../templates/wasm/plugin.toml"),
    ),
    (
        "Cargo.toml",
        include_str!("../../templates/wasm/Cargo.toml"),
    ),
];

const NATIVE: &[Template] = &[
    (
        "plugin.toml",
        include_str!("../../templates/native/plugin.toml"),
    ),
    (
        "Cargo.toml",
        include_str!("../../templates/native/Cargo.toml"),
    ),
];

const WASM_BUILD: &str = "Build it (Rust with the `wasm32-wasip1` target: `rustup target add \
wasm32-wasip1`):\n\n```sh\ncargo build --release --target wasm32-wasip1\n```\n\n";

const NATIVE_BUILD: &str = "Build it (Rust, for this machine):\n\n```sh\ncargo build \
--release\n```\n\nThe library is machine code: it runs in a worker confined at its level \
like every plugin, but with no engine sandbox in front of that confinement, so operators \
usually route native plugins to `high` or `maximum`.\n\n";

/// The guest crate this corral was built from, if its source is still there.
fn built_guest() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/guest");
    p.join("Cargo.toml")
        .is_file()
        .then(|| p.canonicalize().ok())
        .flatten()
}

pub(super) fn new_plugin(args: NewArgs) -> Outcome {
    let invalid = |m: String| -> anyhow::Error { Failure::new(exit::INVALID, m).into() };
    let name = args
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id = args.id.clone().unwrap_or(name);
    corral_manifest::validate_id(&id).map_err(|e| {
        invalid(format!(
            "{id:?} cannot be a plugin id ({e}); name the directory after the plugin or pass --id"
        ))
    })?;
    let (files, runtime, build, built): (&[&[Template]], _, _, _) = match args.runtime {
        NewRuntime::Js => (&[JS], "JavaScript", "", ""),
        NewRuntime::Python => (&[PYTHON], "Python", "", ""),
        NewRuntime::Wasm => (
            &[WASM, RUST],
            "Rust for WebAssembly",
            WASM_BUILD,
            "built for `wasm32-wasip1`",
        ),
        NewRuntime::Native => (
            &[NATIVE, RUST],
            "Rust, native",
            NATIVE_BUILD,
            "built for the machine as a shared library (`runtime = \"native\"`)",
        ),
    };
    let guest = match args.runtime {
        NewRuntime::Wasm | NewRuntime::Native => {
            let g = args.guest.clone().or_else(built_guest).ok_or_else(|| {
                invalid(
                    "where is the guest crate? pass --guest PATH (crates/guest of Corral's \
                     source) or set CORRAL_GUEST"
                        .into(),
                )
            })?;
            if !g.join("Cargo.toml").is_file() {
                return Err(invalid(format!(
                    "{} is not the guest crate: it has no Cargo.toml",
                    g.display()
                )));
            }
            g.canonicalize()
                .map_err(|e| invalid(format!("{}: {e}", g.display())))?
                .to_string_lossy()
                .into_owned()
        }
        _ => String::new(),
    };
    if args.dir.exists() {
        let empty = std::fs::read_dir(&args.dir)
            .map_err(|e| invalid(format!("cannot read {}: {e}", args.dir.display())))?
            .next()
            .is_none();
        if !empty {
            return Err(invalid(format!(
                "{} is not empty: corral new writes into a new or empty directory",
                args.dir.display()
            )));
        }
    }
    let fill = |text: &str| {
        text.replace("{{id}}", &id)
            .replace("{{crate}}", &id.replace('-', "_"))
            .replace("{{guest}}", &guest)
            .replace("{{runtime}}", runtime)
            .replace("{{build}}", build)
            .replace("{{built}}", built)
    };
    let mut written = Vec::new();
    for (path, text) in files.iter().copied().flatten().chain(COMMON) {
        let to = args.dir.join(path);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Failure::new(exit::FAILURE, format!("{}: {e}", parent.display())))?;
        }
        std::fs::write(&to, fill(text))
            .map_err(|e| Failure::new(exit::FAILURE, format!("{}: {e}", to.display())))?;
        written.push(path.to_string());
    }
    if args.json {
        print_json(&serde_json::json!({
            "ok": true, "id": id, "dir": args.dir.display().to_string(),
            "runtime": format!("{:?}", args.runtime).to_lowercase(), "files": written,
        }))?;
    } else {
        println!(
            "wrote plugin {id} ({runtime}) in {}: {}",
            args.dir.display(),
            written.join(", ")
        );
        match args.runtime {
            NewRuntime::Wasm => println!(
                "build it:  cd {} && cargo build --release --target wasm32-wasip1",
                args.dir.display()
            ),
            NewRuntime::Native => {
                println!(
                    "build it:  cd {} && cargo build --release",
                    args.dir.display()
                )
            }
            NewRuntime::Js | NewRuntime::Python => {}
        }
        println!(
            "test it:   corral test {} --policy {}/dev-policy.toml",
            args.dir.display(),
            args.dir.display()
        );
    }
    Ok(exit::OK)
}
