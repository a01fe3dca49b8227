//! The crate's import graph, read from the source text: every `crate::<module>` reference
//! outside comments is an arrow from the module (a file or folder under `src/`) that holds it.
//! ARCHITECTURE.md draws the layers; this test keeps them honest: no circle anywhere, and the
//! lower parts never reach up (the store and the adapters know no client, the config knows no
//! adapter).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `module -> modules it refers to`, for the crate under `src/`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&src, &mut files);
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let first = relative
            .components()
            .next()
            .expect("a path")
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if first == "main" || first == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        let edges = graph.entry(first.clone()).or_default();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let target: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !target.is_empty() && target != first {
                    edges.insert(target);
                }
            }
        }
    }
    graph
}

fn collect(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

#[test]
fn the_import_graph_has_no_circle() {
    let graph = graph();
    // Kahn's algorithm: whatever cannot be ordered sits on a circle.
    let mut remaining = graph.clone();
    loop {
        let leaves: Vec<String> = remaining
            .iter()
            .filter(|(_, to)| to.iter().all(|t| !remaining.contains_key(t)))
            .map(|(from, _)| from.clone())
            .collect();
        if leaves.is_empty() {
            break;
        }
        for leaf in leaves {
            remaining.remove(&leaf);
        }
    }
    assert!(
        remaining.is_empty(),
        "modules on an import circle: {:#?}",
        remaining
    );
}

#[test]
fn lower_parts_never_reach_up() {
    let graph = graph();
    let forbidden: &[(&str, &[&str])] = &[
        // The state file and the adapters know no client and no loop above them.
        (
            "store",
            &[
                "revkeen", "worker", "sources", "run", "daemon", "server", "ops", "http",
            ],
        ),
        (
            "sources",
            &["revkeen", "worker", "run", "daemon", "server", "ops"],
        ),
        // The config names no adapter and no part that runs.
        (
            "config",
            &[
                "sources", "store", "worker", "revkeen", "run", "daemon", "server", "ops",
            ],
        ),
        // The RevKeen client only speaks HTTP: it never reads the store or the worker.
        ("revkeen", &["store", "worker", "sources", "run", "daemon"]),
        // Shared plumbing is for everyone, so it uses no one's types.
        ("http", &["revkeen", "sources", "store", "worker", "config"]),
        ("keys", &["revkeen", "sources", "store", "worker"]),
        // Redaction is for every layer, so it knows none.
        (
            "secret",
            &["config", "http", "store", "sources", "revkeen", "worker"],
        ),
    ];
    for (module, not) in forbidden {
        let edges = graph.get(*module).cloned().unwrap_or_default();
        for target in *not {
            assert!(
                !edges.contains(*target),
                "{module} refers to {target}: {edges:?}"
            );
        }
    }
}

#[test]
fn the_simulators_know_nothing_of_the_daemon() {
    let sim = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/sim/src");
    let mut files = Vec::new();
    collect(&sim, &mut files);
    assert!(!files.is_empty());
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable");
        assert!(
            !text.contains("sync_daemon::"),
            "{} uses the daemon crate",
            file.display()
        );
    }
}
