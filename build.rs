//! Records the git commit the binary is built from, for `--version`, and compresses the
//! release binary's debug sections.

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| !o.stdout.is_empty());
    let suffix = if dirty { "-modified" } else { "" };
    println!("cargo:rustc-env=SYNC_DAEMON_GIT_COMMIT={commit}{suffix}");
    // In a worktree `.git` is a file; ask git where HEAD and the index live. Outside a checkout
    // (a source tarball) there is nothing to watch and the commit stays "unknown".
    let git_dir = Command::new("git")
        .args(["rev-parse", "--git-dir"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string());
    match git_dir {
        Some(dir) => {
            println!("cargo:rerun-if-changed={dir}/HEAD");
            println!("cargo:rerun-if-changed={dir}/index");
        }
        None => println!("cargo:rerun-if-changed=build.rs"),
    }
    // A release build keeps line tables so that a panic's backtrace names file:line; zlib
    // shrinks the binary from 103 MiB to 45 MiB, and std's backtrace reads them
    // compressed. No profile key asks the linker for it, and RUSTFLAGS would reach every crate and
    // profile (rebuilding them all, compressing test binaries); this is the release link of
    // the `sync-daemon` binary only.
    let release = std::env::var("PROFILE").is_ok_and(|profile| profile == "release");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if release && linux {
        // -O2: LLD compresses at zlib level 6 instead of 1 (1.4 MiB smaller).
        println!("cargo:rustc-link-arg-bins=-Wl,--compress-debug-sections=zlib");
        println!("cargo:rustc-link-arg-bins=-Wl,-O2");
    }
}
