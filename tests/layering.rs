//! The module graph of `src/`, `raft/src/` and `storage/src/` has no cycles, and a few layering
//! rules from ARCHITECTURE.md hold. Read from the source text, as rust-analyzer's tidy tests do:
//! a module "uses" another when its code (tests excluded) names `crate::other` or
//! `super::other` from a sibling file, at the granularity of the crate's top-level modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module of a file under a crate's `src/`: `node.rs` -> node, `kafka/x.rs` -> kafka.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let first = rel
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().to_string());
    first
        .unwrap_or_default()
        .trim_end_matches(".rs")
        .to_string()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The file's code without comments (a doc link is not a dependency) and without its test
/// modules: everything from the first `#[cfg(test)]` on (the project keeps tests at the end of a
/// file or in `*_tests.rs` / `tests.rs` files).
fn code_of(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let code = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    code.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Module -> the crate's other top-level modules it uses.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(src, f)).collect();
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if name.ends_with("_tests.rs") || name == "tests.rs" || name == "test_util.rs" {
            continue;
        }
        let from = module_of(src, f);
        let code = code_of(f);
        let uses = g.entry(from.clone()).or_default();
        for m in &modules {
            if *m == from || m == "lib" || m == "main" {
                continue;
            }
            let named =
                code.contains(&format!("crate::{m}::")) || code.contains(&format!("crate::{m};"));
            // `use crate::{a, b::c}` lists.
            let listed = code
                .split("use crate::{")
                .skip(1)
                .filter_map(|rest| rest.split('}').next())
                .any(|list| {
                    list.split(',')
                        .any(|item| item.trim().split("::").next() == Some(m))
                });
            let sibling = f.parent() == Some(src) && code.contains(&format!("super::{m}::"));
            if named || listed || sibling {
                uses.insert(m.clone());
            }
        }
    }
    g
}

/// One cycle, if any: a path that comes back to its start.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut c = stack[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for next in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, g, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        if let Some(c) = visit(n, g, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn no_import_cycles_between_modules() {
    for dir in ["src", "raft/src", "storage/src"] {
        let g = graph(&root().join(dir));
        assert!(
            g.len() > 3,
            "{dir}: found too few modules, the reader is broken"
        );
        if let Some(c) = find_cycle(&g) {
            panic!("{dir}: import cycle {}", c.join(" -> "));
        }
    }
}

#[test]
fn layers_point_down() {
    let g = graph(&root().join("src"));
    let uses = |m: &str| g.get(m).cloned().unwrap_or_default();
    // What handlers and loops share must not reach up to who runs them.
    for above in [
        "node",
        "membership",
        "partition",
        "kafka",
        "admin",
        "server",
        "testkit",
    ] {
        assert!(!uses("broker").contains(above), "broker uses {above}");
    }
    // The controller's state is applied the same on every node: no runtime below it.
    for m in ["broker", "rpc", "node", "kafka", "partition", "membership"] {
        assert!(!uses("controller").contains(m), "controller uses {m}");
    }
    // The CLI is a Kafka client: it speaks the protocol, never the broker's insides.
    // `scram` is SASL's math, which a client needs as much as the broker (it is protocol).
    let cli = uses("cli");
    assert!(
        cli.iter()
            .all(|m| m == "errors" || m == "config" || m == "acl_types" || m == "scram"),
        "cli uses {cli:?}"
    );
    // Only the composition root and its runners start nodes.
    for (m, deps) in &g {
        if deps.contains("node") {
            assert!(["server", "testkit"].contains(&m.as_str()), "{m} uses node");
        }
    }
}

#[test]
fn the_reader_sees_a_planted_cycle() {
    let dir = std::env::temp_dir().join(format!("sluice-layering-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("b")).unwrap();
    std::fs::write(dir.join("lib.rs"), "mod a; mod b; mod c; mod d;").unwrap();
    std::fs::write(dir.join("a.rs"), "use crate::b::thing;").unwrap();
    std::fs::write(dir.join("b/mod.rs"), "pub mod x;").unwrap();
    std::fs::write(dir.join("b/x.rs"), "use crate::{c, d::y};").unwrap();
    std::fs::write(dir.join("c.rs"), "fn f() {}\n#[cfg(test)]\nuse crate::a;").unwrap();
    std::fs::write(
        dir.join("d.rs"),
        "//! See [`crate::c::z`].\nfn g() { crate::a::h() }",
    )
    .unwrap();
    let g = graph(&dir);
    let c = find_cycle(&g);
    let _ = std::fs::remove_dir_all(&dir);
    // a -> b -> d -> a; c's use of a is in a test and does not count.
    assert!(c.is_some(), "{g:?}");
    assert!(!g["c"].contains("a"));
    // d's doc link to c is not a use.
    assert!(!g["d"].contains("c"));
}
