//! Pins the worker to the CPython it was built against: RUNPATH to that libpython
//! (otherwise the loader may silently pick another 3.11, such as Debian's), and the
//! interpreter's standard library location compiled in.

use std::process::Command;

fn main() {
    pyo3_build_config::use_pyo3_cfgs();
    let config = pyo3_build_config::get();
    let lib_dir = config
        .lib_dir()
        .map(str::to_owned)
        .expect("pyo3-build-config found no libpython directory; set PYO3_PYTHON");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    println!("cargo:rustc-env=CORRAL_PYTHON_LIBDIR={lib_dir}");

    let python = config
        .executable()
        .map(str::to_owned)
        .expect("pyo3-build-config found no interpreter; set PYO3_PYTHON");
    let out = Command::new(&python)
        .args([
            "-I",
            "-S",
            "-c",
            "import sys, sysconfig; print(sys.base_prefix); \
             print(sysconfig.get_path('stdlib')); \
             print(sysconfig.get_config_var('DESTSHARED')); \
             print(sys.version.split()[0]); \
             print(sysconfig.get_path('purelib'))",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        out.status.success(),
        "{python} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 paths");
    let lines: Vec<&str> = text.lines().collect();
    let [prefix, stdlib, dynload, version, site_packages] = lines[..] else {
        panic!("unexpected answer from {python}: {text:?}");
    };
    println!("cargo:rustc-env=CORRAL_PYTHON_EXECUTABLE={python}");
    println!("cargo:rustc-env=CORRAL_PYTHON_PREFIX={prefix}");
    println!("cargo:rustc-env=CORRAL_PYTHON_STDLIB={stdlib}");
    println!("cargo:rustc-env=CORRAL_PYTHON_DYNLOAD={dynload}");
    println!("cargo:rustc-env=CORRAL_PYTHON_VERSION={version}");
    println!("cargo:rustc-env=CORRAL_PYTHON_SITE_PACKAGES={site_packages}");
    println!(
        "cargo:rustc-env=CORRAL_PYTHON_LIBS={}",
        extension_libraries(dynload).join(":")
    );
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
}

/// The shared libraries the standard library's extension modules link against
/// (libffi for ctypes, libsqlite3, libssl, libz...): they must stay readable under
/// confinement, and be shown in the `maximum` view, for `import ctypes` and the
/// like to work. Asked of `ldd` here, once; the worker keeps those that exist.
fn extension_libraries(dynload: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dynload) else {
        return Vec::new();
    };
    let modules: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "so"))
        .collect();
    let Ok(out) = Command::new("ldd").args(&modules).output() else {
        println!("cargo:warning=ldd not found: the Python worker lists no extension libraries");
        return Vec::new();
    };
    let mut libs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("=> ").nth(1))
        .filter_map(|rest| rest.split(" (").next())
        .filter(|p| p.starts_with('/'))
        .map(str::to_owned)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}
