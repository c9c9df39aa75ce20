//! What may import what (ARCHITECTURE.md, "Layers"): the crate's top-level modules in one
//! order, and each may use only the modules before it. So the module graph has no cycle,
//! `backend` is a hook client that knows nothing of the server, and `rules` knows nothing of
//! the configuration file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The top-level modules, lowest layer first.
const LAYERS: &[&str] = &[
    "action",
    "clock",
    "metrics",
    "peer",
    "crdt",
    "protocol",
    "log",
    "rules",
    "config",
    "cluster",
    "backend",
    "server",
    "transports",
    "run",
];

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).expect("read src");
    for entry in entries {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a source file belongs to (`src/server/hub.rs` → `server`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_owned())
}

/// The modules a source names as `crate::<module>`.
fn used_modules(text: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            used.insert(name);
        }
    }
    used
}

fn forbidden_edges() -> Vec<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let layer = |name: &str| LAYERS.iter().position(|layer| *layer == name);
    let mut forbidden = Vec::new();
    for file in files {
        let Some(module) = module_of(&src, &file) else {
            continue;
        };
        // The crate root and the binary sit above every layer.
        let Some(own) = layer(&module) else {
            assert!(
                module == "lib" || module == "main",
                "{} is in no layer: add its module to LAYERS",
                file.display()
            );
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read source");
        for used in used_modules(&text) {
            match layer(&used) {
                Some(other) if other < own || used == module => {}
                _ => forbidden.push(format!("{} uses crate::{used}", file.display())),
            }
        }
    }
    forbidden
}

#[test]
fn each_module_uses_only_the_layers_below_it() {
    let forbidden = forbidden_edges();
    assert!(
        forbidden.is_empty(),
        "imports against the layer order {LAYERS:?}:\n{}",
        forbidden.join("\n")
    );
}

#[test]
fn the_import_scanner_finds_crate_paths() {
    let used = used_modules("use crate::log::Log;\nlet x = crate::server::objects::decode(y);");
    assert_eq!(
        used.into_iter().collect::<Vec<_>>(),
        vec!["log".to_owned(), "server".to_owned()]
    );
}
