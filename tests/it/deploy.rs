//! The deployment files say what the issue promises an operator:
//! - both systemd units pass `systemd-analyze verify` (pointed at the built binary) and rate an
//!   exposure of at most 2.0 in `systemd-analyze security --offline=true`, the figure the README
//!   quotes; the service is `Type=notify` with a watchdog, a dynamic user, credentials, a
//!   `check-config` before start, no restart on exit 78, and the required hardening. Where
//!   `systemd-analyze` is not installed they fail, naming the Debian package (`systemd`).
//! - the units load the credentials directory, so they start with the key files of the
//!   configured sources only, and the daemon reads its keys from what systemd makes of it.
//! - `deploy/k8s/sidecar.yaml` is a native sidecar with readiness on `/readyz`, startup and
//!   liveness on `/healthz`, keys from a Secret, state on a PersistentVolumeClaim and a grace
//!   period above the drain timeout.
//! - the Debian package (`[package.metadata.deb]`) installs the binary, config and README where
//!   the units name them, installs both units disabled, and ships what deploy/deb/build makes.
//! - the declared `MIT OR Apache-2.0` has both license texts in the repository.
//! - `deploy/docker/Dockerfile` is a multi-stage release build (debuginfo stripped) on a
//!   distroless non-root base with an exec-form entrypoint, a `HEALTHCHECK` through
//!   `sync-daemon healthcheck` and a state volume.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{BIN, require_tool};

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every value of `key=` in a unit file, comments skipped.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#') && !line.starts_with(';'))
        .filter_map(|line| line.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

/// `systemd-analyze` and its version line; fails the test when it is not installed.
fn systemd_analyze() -> (PathBuf, String) {
    let tool = require_tool("systemd-analyze", "systemd");
    let out = Command::new(&tool)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("run {} --version: {e}", tool.display()));
    assert!(
        out.status.success(),
        "{} --version failed:\n{}",
        tool.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    (tool, version)
}

const UNITS: [&str; 2] = ["sync-daemon.service", "sync-daemon-backfill.service"];

/// Both units copied into a temp dir with `/usr/bin/sync-daemon` replaced by the built
/// binary (verify checks that every Exec…= program exists).
fn units_with_built_binary() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let paths = UNITS
        .iter()
        .map(|name| {
            let text = read(&format!("deploy/systemd/{name}"));
            assert!(
                text.contains("/usr/bin/sync-daemon"),
                "{name} should start /usr/bin/sync-daemon"
            );
            let path = dir.path().join(name);
            std::fs::write(&path, text.replace("/usr/bin/sync-daemon", BIN)).expect("write unit");
            path
        })
        .collect();
    (dir, paths)
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let (tool, version) = systemd_analyze();
    let (_dir, paths) = units_with_built_binary();
    let out = Command::new(&tool)
        .arg("verify")
        .args(&paths)
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed ({version}):\n{stderr}"
    );
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|line| UNITS.iter().any(|unit| line.contains(unit)))
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complained about the units:\n{}",
        complaints.join("\n")
    );
}

/// The exposure score from `systemd-analyze security` output.
fn exposure(output: &str) -> Option<f64> {
    let line = output
        .lines()
        .find(|line| line.contains("Overall exposure level"))?;
    let (_, rest) = line.rsplit_once(':')?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn systemd_units_rate_an_exposure_of_at_most_2_and_the_readme_says_so() {
    let (tool, version) = systemd_analyze();
    let (_dir, paths) = units_with_built_binary();
    let mut service_score = None;
    for path in &paths {
        let out = Command::new(&tool)
            .args(["security", "--offline=true", "--no-pager"])
            .arg(path)
            .output()
            .expect("run systemd-analyze security");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let score = exposure(&stdout).unwrap_or_else(|| {
            panic!(
                "no exposure level in systemd-analyze security output for {}:\n{stdout}\n{}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert!(
            score <= 2.0,
            "{}: exposure {score} ({version}); the target is at most 2.0",
            path.display()
        );
        if path.ends_with("sync-daemon.service") {
            service_score = Some(score);
        }
    }

    // The README quotes the score (for the systemd version it names).
    let readme = read("README.md");
    let at = readme
        .find("systemd-analyze security")
        .expect("README quotes `systemd-analyze security`");
    let after = &readme[at..(at + 200).min(readme.len())];
    let quoted: f64 = after
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find(|token| token.contains('.') && token.parse::<f64>().is_ok())
        .and_then(|token| token.parse().ok())
        .expect("a score after `systemd-analyze security` in the README");
    assert!(quoted <= 2.0, "README quotes {quoted}");
    let major = version
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    if after.contains(&format!("systemd {major}")) {
        assert_eq!(
            Some(quoted),
            service_score,
            "the README's score differs from what systemd {major} rates now"
        );
    }
}

#[test]
fn the_service_unit_has_what_an_operator_relies_on() {
    let unit = read("deploy/systemd/sync-daemon.service");
    let one = |key: &str| -> String {
        let values = unit_values(&unit, key);
        assert!(!values.is_empty(), "sync-daemon.service lacks {key}=");
        values.last().cloned().unwrap_or_default()
    };
    assert_eq!(one("Type"), "notify");
    assert!(!one("WatchdogSec").is_empty());
    assert_eq!(one("DynamicUser"), "yes");
    assert_eq!(one("StateDirectory"), "sync-daemon");
    assert_eq!(
        unit_values(&unit, "LoadCredential"),
        [CREDENTIALS_LINE],
        "the keys come in as credentials, loaded from their directory"
    );
    assert!(
        unit_values(&unit, "ExecStartPre")
            .iter()
            .any(|v| v.contains("sync-daemon") && v.contains("check-config"))
    );
    assert!(!one("ExecStart").contains("--once"));
    // `systemctl reload` re-reads the keys (SIGHUP, which no longer ends the daemon).
    assert!(one("ExecReload").contains("kill -HUP $MAINPID"));
    assert_eq!(one("Restart"), "on-failure");
    let descriptors: usize = one("LimitNOFILE")
        .parse()
        .expect("LimitNOFILE= is a number");
    assert!(
        descriptors >= 4 * sync_daemon::server::MAX_CONNECTIONS,
        "LimitNOFILE={descriptors} leaves too little beside the server's connection cap"
    );
    assert!(
        one("RestartPreventExitStatus")
            .split_whitespace()
            .any(|code| code == "78"),
        "a config error (78) must not restart-loop"
    );
    assert_eq!(one("ProtectSystem"), "strict");
    for key in [
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "NoNewPrivileges",
    ] {
        assert_eq!(one(key), "yes", "{key}");
    }
    let families: Vec<String> = one("RestrictAddressFamilies")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(families, ["AF_INET", "AF_INET6", "AF_UNIX"]);
    assert!(
        unit_values(&unit, "SystemCallFilter")
            .iter()
            .any(|v| v == "@system-service")
    );
    assert_eq!(one("CapabilityBoundingSet"), "", "no capabilities");
    // systemd's stop timeout must leave room for the drain (default 10 s).
    let stop = one("TimeoutStopSec");
    let secs: u64 = stop
        .trim_end_matches('s')
        .parse()
        .unwrap_or_else(|_| panic!("TimeoutStopSec={stop} in plain seconds"));
    assert!(
        secs > 10,
        "TimeoutStopSec={stop} is not above the 10 s drain"
    );

    let backfill = read("deploy/systemd/sync-daemon-backfill.service");
    assert_eq!(unit_values(&backfill, "Type"), ["oneshot"]);
    assert_eq!(
        unit_values(&backfill, "OnSuccess"),
        ["sync-daemon.service"],
        "a finished backfill starts the daemon again"
    );
    for text in [&unit, &backfill] {
        assert_eq!(
            unit_values(text, "EnvironmentFile"),
            ["-/etc/default/sync-daemon"],
            "optional overrides without editing the unit"
        );
        // Documentation= names a file the install steps put there.
        for doc in unit_values(text, "Documentation") {
            let path = doc.trim_start_matches("file://");
            assert!(
                unit.contains(&format!("README.md {path}")),
                "{path} is never installed"
            );
        }
    }
    assert!(
        unit_values(&backfill, "ExecStart")
            .iter()
            .any(|v| v.contains("--once"))
    );
}

/// The `LoadCredential=` of both units: every file of the directory, none named one by one.
const CREDENTIALS_LINE: &str = "sync-daemon:/etc/sync-daemon/credentials";

/// What systemd makes of a unit's `LoadCredential=ID:PATH` lines (systemd.exec(5)), with
/// `/etc/sync-daemon/credentials` at `host`: a file becomes the credential `ID`, every regular
/// file of a directory becomes `ID_<file name>`, and a path that does not exist fails the unit
/// before it starts. The credentials are written into `into`; `Err` names what fails the unit.
fn load_credentials(unit: &str, host: &Path, into: &Path) -> Result<(), String> {
    for value in unit_values(unit, "LoadCredential") {
        let (id, path) = value
            .split_once(':')
            .ok_or_else(|| format!("LoadCredential={value}: no path"))?;
        let relative = Path::new(path)
            .strip_prefix("/etc/sync-daemon/credentials")
            .unwrap_or_else(|_| {
                panic!("LoadCredential={value}: outside the credentials directory")
            });
        let source = host.join(relative);
        if source.is_dir() {
            for entry in std::fs::read_dir(&source).expect("read the credentials directory") {
                let entry = entry.expect("directory entry");
                if entry.file_type().expect("file type").is_file() {
                    let name = format!("{id}_{}", entry.file_name().to_string_lossy());
                    std::fs::copy(entry.path(), into.join(name)).expect("copy credential");
                }
            }
        } else if source.is_file() {
            std::fs::copy(&source, into.join(id)).expect("copy credential");
        } else {
            return Err(format!(
                "LoadCredential={value}: {path} does not exist, so the unit fails to start"
            ));
        }
    }
    Ok(())
}

/// A merchant with one Wodify gym writes two key files, RevKeen's and the gym's, and nothing
/// about PracticeHub: both units start (no `LoadCredential=` names a missing file) and the
/// daemon finds both keys in `$CREDENTIALS_DIRECTORY`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_units_start_with_the_keys_of_the_configured_sources_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let host = dir.path().join("etc-credentials");
    std::fs::create_dir(&host).expect("mkdir");
    std::fs::write(host.join("revkeen_api_key"), "rk_live_unit_test\n").expect("write");
    std::fs::write(host.join("gym_api_key"), "wodify_unit_test\n").expect("write");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstate_path = \"{}\"\n\n[revkeen]\nbase_url = \"http://127.0.0.1:9/v2\"\n\n\
             [[sources]]\nname = \"gym\"\nkind = \"wodify\"\nbase_url = \"http://127.0.0.1:9/v1\"\n",
            dir.path().join("state.db").display()
        ),
    )
    .expect("write config");
    for name in UNITS {
        let unit = read(&format!("deploy/systemd/{name}"));
        let credentials = tempfile::tempdir().expect("temp dir");
        if let Err(problem) = load_credentials(&unit, &host, credentials.path()) {
            panic!("{name}: {problem}");
        }
        let mut command = crate::support::command(dir.path());
        command
            .args(["check-config", "--config"])
            .arg(&config)
            .env("CREDENTIALS_DIRECTORY", credentials.path());
        let out = crate::support::run_command(command).await;
        assert_eq!(
            out.code,
            Some(0),
            "{name}: the daemon did not find its keys among the credentials\n{}",
            out.transcript()
        );
        assert!(
            !out.stdout.contains("unit_test") && !out.stderr.contains("unit_test"),
            "a key was printed\n{}",
            out.transcript()
        );
    }
}

/// `[package.metadata.deb]` in Cargo.toml, read as TOML.
fn deb_metadata() -> config::Config {
    config::Config::builder()
        .add_source(config::File::from_str(
            &read("Cargo.toml"),
            config::FileFormat::Toml,
        ))
        .build()
        .expect("Cargo.toml is TOML")
}

/// The package installs the binary, the config and the README where both units look for
/// them, installs both units disabled, and ships every file deploy/deb/build generates.
#[test]
fn the_debian_package_installs_what_the_units_start() {
    let metadata = deb_metadata();
    let assets: Vec<Vec<String>> = metadata
        .get("package.metadata.deb.assets")
        .expect("[package.metadata.deb] assets");
    // Where an asset lands, as cargo-deb resolves it: a destination ending in / is a directory.
    let installed = |source: &str| -> String {
        let asset = assets
            .iter()
            .find(|a| a[0] == source)
            .unwrap_or_else(|| panic!("no asset {source}: {assets:?}"));
        let dest = &asset[1];
        let name = Path::new(source)
            .file_name()
            .expect("a file")
            .to_string_lossy();
        let path = if dest.ends_with('/') {
            format!("/{dest}{name}")
        } else {
            format!("/{dest}")
        };
        path.replace("//", "/")
    };
    let binary = installed("target/release/sync-daemon");
    assert_eq!(binary, "/usr/bin/sync-daemon");
    let config = installed("config/example.toml");
    let readme = installed("README.md");
    for name in UNITS {
        let unit = read(&format!("deploy/systemd/{name}"));
        for key in ["ExecStartPre", "ExecStart"] {
            for line in unit_values(&unit, key) {
                let program = line.split_whitespace().next().unwrap_or_default();
                assert_eq!(program, binary, "{name}: {key}={line}");
                assert!(
                    line.contains(&format!("--config {config}")),
                    "{name}: {key}={line}"
                );
            }
        }
        assert_eq!(
            unit_values(&unit, "Documentation"),
            [format!("file://{readme}")],
            "{name}"
        );
    }

    let units: Vec<std::collections::HashMap<String, config::Value>> = metadata
        .get("package.metadata.deb.systemd-units")
        .expect("[package.metadata.deb] systemd-units");
    for name in UNITS {
        let stem = name.trim_end_matches(".service");
        let entry = units
            .iter()
            .find(|u| u.get("unit-name").map(ToString::to_string).as_deref() == Some(stem))
            .unwrap_or_else(|| panic!("systemd-units has no entry for {name}"));
        for (key, expected) in [
            ("unit-scripts", "deploy/systemd"),
            ("enable", "false"),
            ("start", "false"),
        ] {
            assert_eq!(
                entry.get(key).map(ToString::to_string).as_deref(),
                Some(expected),
                "{name}: {key} (a merchant configures before the daemon may start)"
            );
        }
    }

    // Every generated asset is written by deploy/deb/build (a glob: into its directory).
    let build = read("deploy/deb/build");
    for asset in assets.iter().filter(|a| a[0].starts_with("target/assets/")) {
        let relative = asset[0].trim_start_matches("target/assets/");
        let written = match relative.rsplit_once('/') {
            Some((dir, file)) if file.contains('*') => dir,
            _ => relative,
        };
        assert!(
            build.contains(&format!("\"$assets/{written}\"")),
            "deploy/deb/build does not write {}",
            asset[0]
        );
    }
}

/// The indented block under the first line containing `header`, up to the next line indented
/// no deeper than it.
fn yaml_block<'a>(yaml: &'a str, header: &str) -> &'a str {
    let start = yaml
        .find(header)
        .unwrap_or_else(|| panic!("no {header:?} in the YAML"));
    let line_start = yaml[..start].rfind('\n').map_or(0, |i| i + 1);
    let indent = start - line_start;
    let body_start = yaml[start..]
        .find('\n')
        .map_or(yaml.len(), |i| start + i + 1);
    let mut end = body_start;
    for line in yaml[body_start..].split_inclusive('\n') {
        let trimmed = line.trim_start();
        let depth = line.len() - trimmed.len();
        if !trimmed.trim().is_empty() && depth <= indent && !trimmed.starts_with('-') {
            break;
        }
        if !trimmed.trim().is_empty() && depth < indent {
            break;
        }
        end += line.len();
    }
    &yaml[body_start..end]
}

#[test]
fn the_kubernetes_manifest_runs_a_native_sidecar() {
    let yaml = read("deploy/k8s/sidecar.yaml");
    let sidecar = yaml_block(&yaml, "initContainers:");
    assert!(
        sidecar.contains("restartPolicy: Always"),
        "a native sidecar is an init container with restartPolicy: Always:\n{sidecar}"
    );
    // Startup on /healthz, not /readyz: the app container waits for the sidecar to start, and
    // a refused RevKeen key must not hold the merchant's app back.
    for (probe, path) in [
        ("startupProbe:", "/healthz"),
        ("readinessProbe:", "/readyz"),
        ("livenessProbe:", "/healthz"),
    ] {
        let at = sidecar
            .find(probe)
            .unwrap_or_else(|| panic!("the sidecar has no {probe}"));
        let first_path = sidecar[at..]
            .split("path:")
            .nth(1)
            .and_then(|rest| rest.split([',', '}', '\n']).next())
            .map(str::trim)
            .unwrap_or_default();
        assert_eq!(first_path, path, "{probe} checks {first_path:?}");
    }
    assert!(yaml.contains("secretName:"), "keys from a Secret volume");
    assert!(
        yaml.contains("readOnlyRootFilesystem: true")
            && yaml.contains("{name: tmp, mountPath: /tmp}")
            && yaml.contains("emptyDir:"),
        "a read-only root filesystem comes with a writable /tmp"
    );
    assert!(
        yaml.contains("persistentVolumeClaim:") && yaml.contains("kind: PersistentVolumeClaim"),
        "state on a PersistentVolumeClaim"
    );
    let grace: u64 = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .expect("terminationGracePeriodSeconds")
        .trim()
        .parse()
        .expect("seconds");
    let drain: u64 = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("drain_timeout_secs ="))
        .map_or(10, |v| v.trim().parse().expect("drain_timeout_secs"));
    assert!(
        grace > drain,
        "terminationGracePeriodSeconds {grace} must exceed drain_timeout_secs {drain}"
    );
}

#[test]
fn the_dockerfile_builds_a_distroless_nonroot_image_with_a_healthcheck() {
    let dockerfile = read("deploy/docker/Dockerfile");
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&str> = instructions
        .iter()
        .copied()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    let last = froms.last().expect("a FROM");
    assert!(
        last.contains("distroless") && last.contains("nonroot"),
        "the final stage should be a distroless non-root base: {last}"
    );
    assert!(dockerfile.contains("--release"), "a release build");
    // The image's binary leaves its line tables behind (24 MiB instead of 45 MiB).
    let strip = instructions
        .iter()
        .find_map(|l| l.strip_prefix("ARG STRIP="))
        .expect("ARG STRIP= (the release profile's strip for the image)");
    assert!(
        ["debuginfo", "symbols"].contains(&strip),
        "the image strips debuginfo by default: STRIP={strip}"
    );
    assert!(
        dockerfile.contains("CARGO_PROFILE_RELEASE_STRIP=\"$STRIP\" cargo build --release"),
        "the release build uses STRIP"
    );
    let entrypoint = instructions
        .iter()
        .find(|l| l.starts_with("ENTRYPOINT"))
        .expect("an ENTRYPOINT");
    assert!(
        entrypoint
            .trim_start_matches("ENTRYPOINT")
            .trim()
            .starts_with('['),
        "exec-form ENTRYPOINT, so SIGTERM reaches the daemon: {entrypoint}"
    );
    let healthcheck = dockerfile
        .split("HEALTHCHECK")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .expect("a HEALTHCHECK");
    assert!(
        healthcheck.contains("CMD") && healthcheck.contains("\"healthcheck\""),
        "HEALTHCHECK should run `sync-daemon healthcheck` (no curl in distroless): {healthcheck}"
    );
    assert!(
        instructions
            .iter()
            .any(|l| l.starts_with("VOLUME") && l.contains("/var/lib/sync-daemon")),
        "state under a volume"
    );
    if let Some(user) = instructions.iter().find(|l| l.starts_with("USER ")) {
        assert!(
            !user.contains("root") || user.contains("nonroot"),
            "runs as a non-root user: {user}"
        );
    }
}

/// `license = "MIT OR Apache-2.0"` ships both texts, and cargo-deny's policy allows the
/// licenses our own crates declare.
#[test]
fn the_declared_licenses_have_their_texts_beside_the_code() {
    let manifest = read("Cargo.toml");
    assert!(
        manifest.contains("license = \"MIT OR Apache-2.0\""),
        "Cargo.toml declares another license: update the texts and this test"
    );
    let mit = read("LICENSE-MIT");
    assert!(mit.starts_with("MIT License"), "LICENSE-MIT:\n{mit}");
    assert!(mit.contains("Copyright (c) The sync-daemon authors"));
    assert!(mit.contains("THE SOFTWARE IS PROVIDED \"AS IS\""));
    let apache = read("LICENSE-APACHE");
    assert!(apache.contains("Apache License") && apache.contains("Version 2.0, January 2004"));
    assert!(apache.contains("END OF TERMS AND CONDITIONS"));
    let deny = read("deny.toml");
    for license in ["\"MIT\"", "\"Apache-2.0\""] {
        assert!(deny.contains(license), "deny.toml does not allow {license}");
    }
}
