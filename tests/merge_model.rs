//! Property tests of the merge against a naive reference model.
//!
//! Random stacks of layers (files, directories, symlinks, hard links, whiteouts, opaque
//! markers), with names from a tiny alphabet so that paths collide across layers and kinds,
//! are merged by `fledge::merge::merge_layers` and by [`Model`], a path-keyed map that
//! applies the OCI rules one entry at a time. The two must agree on every path (kind, mode,
//! mtime, content or target), on hard-link groups, and on which stacks are errors.
//!
//! The generator keeps symlinks in leaf position (their names `s`/`t` are never used as a
//! parent), so the model needs no symlink resolution: following symlinks among parents is
//! covered by the table tests in src/merge/tests.rs and by tests/hostile.rs.
//!
//! A second property checks the invariants of `freeze()` on the same stacks: entries sorted
//! and unique, `nlink` equal to the entries reaching a node (2 + subdirectories for a
//! directory), `parent` links, every node reachable and every directory reached once.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use fledge::tree::{NodeId, NodeKind, Tree, ROOT};
use proptest::prelude::*;
use support::kit::{tar, RawEntry};

/// A generated entry; paths are components from the alphabet.
#[derive(Clone, Debug)]
enum Op {
    File {
        path: Vec<&'static str>,
        data: Vec<u8>,
        mode: u32,
        mtime: u64,
    },
    Dir {
        path: Vec<&'static str>,
        mode: u32,
        mtime: u64,
    },
    Symlink {
        path: Vec<&'static str>,
        target: &'static str,
        mtime: u64,
    },
    Hardlink {
        path: Vec<&'static str>,
        target: Vec<&'static str>,
    },
    Whiteout {
        path: Vec<&'static str>,
    },
    Opaque {
        dir: Vec<&'static str>,
    },
}

const DIR_NAMES: &[&str] = &["a", "b", "c"];
const LEAF_NAMES: &[&str] = &["a", "b", "c", "s", "t"];

fn dir_path(max: usize) -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(prop::sample::select(DIR_NAMES), 1..=max)
}

/// 0..=2 directory components, then a leaf that may be a symlink name.
fn leaf_path() -> impl Strategy<Value = Vec<&'static str>> {
    (
        prop::collection::vec(prop::sample::select(DIR_NAMES), 0..=2),
        prop::sample::select(LEAF_NAMES),
    )
        .prop_map(|(mut p, leaf)| {
            p.push(leaf);
            p
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (leaf_path().prop_filter("symlink names are for symlinks", |p| {
                !matches!(p.last(), Some(&"s") | Some(&"t"))
            }),
            prop::collection::vec(any::<u8>(), 0..6),
            prop::sample::select(&[0o644u32, 0o600, 0o4755][..]),
            0u64..4)
            .prop_map(|(path, data, mode, mtime)| Op::File { path, data, mode, mtime }),
        3 => (dir_path(3), prop::sample::select(&[0o755u32, 0o700, 0o1777][..]), 0u64..4)
            .prop_map(|(path, mode, mtime)| Op::Dir { path, mode, mtime }),
        2 => (
            prop::collection::vec(prop::sample::select(DIR_NAMES), 0..=2),
            prop::sample::select(&["s", "t"][..]),
            prop::sample::select(&["a", "../b", "/c/a", "s", ""][..]),
            0u64..4
        )
            .prop_map(|(mut path, leaf, target, mtime)| {
                path.push(leaf);
                Op::Symlink { path, target, mtime }
            }),
        // The target is chosen among earlier entries of the stack by `pick_link_targets`.
        2 => (leaf_path(), leaf_path()).prop_map(|(path, target)| Op::Hardlink { path, target }),
        2 => leaf_path().prop_map(|path| Op::Whiteout { path }),
        1 => dir_path(2).prop_map(|dir| Op::Opaque { dir }),
    ]
}

fn stack() -> impl Strategy<Value = Vec<Vec<Op>>> {
    (
        prop::collection::vec(prop::collection::vec(op(), 0..14), 1..5),
        prop::collection::vec(any::<usize>(), 40),
    )
        .prop_map(|(mut stack, picks)| {
            pick_link_targets(&mut stack, &picks);
            stack
        })
}

/// Point most hard links at a path an earlier entry of the stack wrote (it may have been
/// removed or replaced since: both outcomes are wanted), keeping the generated target for
/// one pick in four. A link to a symlink name gets a symlink name itself, so symlinks stay
/// in leaf position (the model does not follow symlinks).
fn pick_link_targets(stack: &mut [Vec<Op>], picks: &[usize]) {
    let mut written: Vec<Vec<&'static str>> = Vec::new();
    let mut k = 0;
    for layer in stack.iter_mut() {
        for op in layer.iter_mut() {
            match op {
                Op::File { path, .. } | Op::Symlink { path, .. } => written.push(path.clone()),
                Op::Hardlink { path, target } => {
                    let pick = picks[k % picks.len()];
                    k += 1;
                    if !written.is_empty() && pick % 4 != 0 {
                        *target = written[(pick / 4) % written.len()].clone();
                    }
                    let symlink_name = |p: &[&str]| matches!(p.last(), Some(&"s") | Some(&"t"));
                    if symlink_name(target) && !symlink_name(path) {
                        if let Some(leaf) = path.last_mut() {
                            *leaf = "t";
                        }
                    }
                    written.push(path.clone());
                }
                _ => {}
            }
        }
    }
}

fn join(p: &[&str]) -> Vec<u8> {
    p.join("/").into_bytes()
}

fn to_entry(op: &Op) -> RawEntry {
    match op {
        Op::File {
            path,
            data,
            mode,
            mtime,
        } => RawEntry {
            mode: *mode,
            mtime: *mtime,
            ..RawEntry::file(&join(path), data)
        },
        Op::Dir { path, mode, mtime } => RawEntry {
            mode: *mode,
            mtime: *mtime,
            ..RawEntry::dir(&join(path))
        },
        Op::Symlink {
            path,
            target,
            mtime,
        } => RawEntry {
            mtime: *mtime,
            ..RawEntry::symlink(&join(path), target.as_bytes())
        },
        Op::Hardlink { path, target } => RawEntry::hardlink(&join(path), &join(target)),
        Op::Whiteout { path } => {
            let (leaf, parent) = path.split_last().expect("paths are never empty");
            let mut p = parent.to_vec();
            let name = format!(".wh.{leaf}");
            p.push(&name);
            RawEntry::file(&join(&p), b"")
        }
        Op::Opaque { dir } => {
            let mut p = dir.clone();
            p.push(".wh..wh..opq");
            RawEntry::file(&join(&p), b"")
        }
    }
}

// ---------------------------------------------------------------------------------------
// the reference model
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum MKind {
    Dir,
    File(Vec<u8>),
    Symlink(Vec<u8>),
}

#[derive(Clone, Debug)]
struct MNode {
    kind: MKind,
    mode: u32,
    mtime: i64,
}

/// Paths (components joined by `/`) to inode numbers, and the inodes.
#[derive(Default)]
struct Model {
    paths: BTreeMap<String, u64>,
    nodes: HashMap<u64, MNode>,
    next: u64,
}

impl Model {
    fn alloc(&mut self, n: MNode) -> u64 {
        self.next += 1;
        self.nodes.insert(self.next, n);
        self.next
    }

    fn is_dir(&self, path: &str) -> bool {
        self.paths
            .get(path)
            .is_some_and(|i| self.nodes[i].kind == MKind::Dir)
    }

    fn remove_tree(&mut self, path: &str) {
        let prefix = format!("{path}/");
        self.paths
            .retain(|p, _| p != path && !p.starts_with(&prefix));
    }

    /// The parent directories of `path` exist as directories (without creating anything).
    fn parents_exist(&self, path: &[&str]) -> bool {
        (1..path.len()).all(|n| self.is_dir(&path[..n].join("/")))
    }

    /// Create missing parents (0755, mtime 0), replacing non-directories in the way.
    fn make_parents(&mut self, path: &[&str]) {
        for n in 1..path.len() {
            let p = path[..n].join("/");
            if !self.is_dir(&p) {
                self.remove_tree(&p);
                let id = self.alloc(MNode {
                    kind: MKind::Dir,
                    mode: 0o755,
                    mtime: 0,
                });
                self.paths.insert(p, id);
            }
        }
    }

    fn put(&mut self, path: &[&str], node: MNode) {
        self.make_parents(path);
        let p = path.join("/");
        self.remove_tree(&p);
        let id = self.alloc(node);
        self.paths.insert(p, id);
    }

    fn apply_layer(&mut self, ops: &[Op]) -> Result<(), String> {
        for op in ops {
            match op {
                Op::Whiteout { path } if self.parents_exist(path) => {
                    self.remove_tree(&path.join("/"));
                }
                Op::Opaque { dir } => {
                    let d = dir.join("/");
                    if self.parents_exist(dir) && self.is_dir(&d) {
                        let prefix = format!("{d}/");
                        self.paths.retain(|p, _| !p.starts_with(&prefix));
                    }
                }
                _ => {}
            }
        }
        for op in ops {
            match op {
                Op::File {
                    path,
                    data,
                    mode,
                    mtime,
                } => self.put(
                    path,
                    MNode {
                        kind: MKind::File(data.clone()),
                        mode: *mode,
                        mtime: *mtime as i64,
                    },
                ),
                Op::Symlink {
                    path,
                    target,
                    mtime,
                } => self.put(
                    path,
                    MNode {
                        kind: MKind::Symlink(target.as_bytes().to_vec()),
                        mode: 0o777,
                        mtime: *mtime as i64,
                    },
                ),
                Op::Dir { path, mode, mtime } => {
                    self.make_parents(path);
                    let p = path.join("/");
                    let meta_only = self.is_dir(&p);
                    if meta_only {
                        let id = self.paths[&p];
                        let n = self.nodes.get_mut(&id).expect("inode of a path");
                        n.mode = *mode;
                        n.mtime = *mtime as i64;
                    } else {
                        self.put(
                            path,
                            MNode {
                                kind: MKind::Dir,
                                mode: *mode,
                                mtime: *mtime as i64,
                            },
                        );
                    }
                }
                Op::Hardlink { path, target } => {
                    let t = target.join("/");
                    let id = match self.paths.get(&t) {
                        Some(id) if self.parents_exist(target) => *id,
                        _ => {
                            return Err(format!(
                                "hard link {} -> {t}: does not exist",
                                path.join("/")
                            ))
                        }
                    };
                    if self.nodes[&id].kind == MKind::Dir {
                        return Err(format!(
                            "hard link {} -> {t}: is a directory",
                            path.join("/")
                        ));
                    }
                    let p = path.join("/");
                    if p == t {
                        continue;
                    }
                    self.make_parents(path);
                    self.remove_tree(&p);
                    self.paths.insert(p, id);
                }
                Op::Whiteout { .. } | Op::Opaque { .. } => {}
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// comparison
// ---------------------------------------------------------------------------------------

fn layer_file(bytes: &[u8]) -> std::fs::File {
    let mut f = tempfile::tempfile().expect("temp file");
    f.write_all(bytes).expect("write layer");
    f
}

fn merge(stack: &[Vec<Op>]) -> Result<Tree, String> {
    let files = stack
        .iter()
        .map(|ops| layer_file(&tar(&ops.iter().map(to_entry).collect::<Vec<_>>())))
        .collect();
    fledge::merge::merge_layers(files).map_err(|e| e.to_string())
}

/// (kind, mode, mtime) of each path, plus the partition into link groups.
type View = BTreeMap<String, (MKind, u32, i64)>;

fn tree_view(tree: &Tree) -> (View, BTreeMap<String, NodeId>) {
    let mut view = View::new();
    let mut ids = BTreeMap::new();
    tree.walk(|path, id| {
        if id == ROOT && path == b"/" {
            return;
        }
        let p = String::from_utf8_lossy(&path[1..]).into_owned();
        let node = tree.node(id);
        let kind = match &node.kind {
            NodeKind::Dir { .. } => MKind::Dir,
            NodeKind::File { size, .. } => {
                let mut buf = vec![0u8; *size as usize];
                let n = tree.read_at(id, 0, &mut buf).expect("read file");
                buf.truncate(n);
                MKind::File(buf)
            }
            NodeKind::Symlink { target } => MKind::Symlink(target.to_vec()),
            other => panic!("unexpected node kind {other:?} at {p}"),
        };
        view.insert(p.clone(), (kind, node.meta.mode, node.meta.mtime.sec));
        ids.insert(p, id);
    });
    (view, ids)
}

fn model_view(m: &Model) -> View {
    m.paths
        .iter()
        .map(|(p, id)| {
            let n = &m.nodes[id];
            (p.clone(), (n.kind.clone(), n.mode, n.mtime))
        })
        .collect()
}

/// The same paths share a node in the tree exactly when they share an inode in the model.
fn same_groups(m: &Model, ids: &BTreeMap<String, NodeId>) -> Result<(), String> {
    let mut m_to_t: HashMap<u64, NodeId> = HashMap::new();
    let mut t_to_m: HashMap<NodeId, u64> = HashMap::new();
    for (p, mid) in &m.paths {
        let tid = ids[p];
        if *m_to_t.entry(*mid).or_insert(tid) != tid || *t_to_m.entry(tid).or_insert(*mid) != *mid {
            return Err(format!("hard-link groups differ at {p}"));
        }
    }
    Ok(())
}

fn check_freeze_invariants(tree: &Tree) -> Result<(), String> {
    let n = tree.nodes.len();
    let mut refs = vec![0u32; n];
    let mut dir_seen = vec![0u32; n];
    let mut expected_parent: Vec<Option<NodeId>> = vec![None; n];
    expected_parent[ROOT as usize] = Some(ROOT);
    dir_seen[ROOT as usize] = 1;
    for (id, node) in tree.nodes.iter().enumerate() {
        let NodeKind::Dir { entries } = &node.kind else {
            continue;
        };
        for w in entries.windows(2) {
            if w[0].0 >= w[1].0 {
                return Err(format!("entries of node {id} not sorted/unique"));
            }
        }
        let mut subdirs = 0;
        for (name, child) in entries {
            if name.is_empty() || name.contains(&b'/') || **name == *b"." || **name == *b".." {
                return Err(format!("bad name {name:?} in node {id}"));
            }
            let c = *child as usize;
            if c >= n || c == ROOT as usize {
                return Err(format!(
                    "node {id} has child id {c} out of range or the root"
                ));
            }
            refs[c] += 1;
            if matches!(tree.nodes[c].kind, NodeKind::Dir { .. }) {
                subdirs += 1;
                dir_seen[c] += 1;
                expected_parent[c] = Some(id as NodeId);
            } else if expected_parent[c].is_none() {
                expected_parent[c] = Some(id as NodeId);
            }
        }
        if node.nlink != 2 + subdirs {
            return Err(format!("dir {id}: nlink {} != 2 + {subdirs}", node.nlink));
        }
    }
    for (id, node) in tree.nodes.iter().enumerate() {
        if id != ROOT as usize && refs[id] == 0 {
            return Err(format!("node {id} is unreachable"));
        }
        match node.kind {
            NodeKind::Dir { .. } => {
                if dir_seen[id] != 1 {
                    return Err(format!("dir {id} reached {} times", dir_seen[id]));
                }
                if Some(node.parent) != expected_parent[id] {
                    return Err(format!("dir {id}: parent {} wrong", node.parent));
                }
            }
            _ => {
                if node.nlink != refs[id] {
                    return Err(format!(
                        "node {id}: nlink {} != {} entries",
                        node.nlink, refs[id]
                    ));
                }
                // The parent of a link group is the directory of one of its entries.
                let parent_ok = matches!(&tree.nodes[node.parent as usize].kind,
                    NodeKind::Dir { entries } if entries.iter().any(|(_, c)| *c as usize == id));
                if !parent_ok {
                    return Err(format!(
                        "node {id}: parent {} does not hold it",
                        node.parent
                    ));
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn merge_equals_the_reference_model(stack in stack()) {
        let mut model = Model::default();
        let expected = stack.iter().try_for_each(|ops| model.apply_layer(ops));
        let merged = merge(&stack);
        match (expected, merged) {
            (Ok(()), Ok(tree)) => {
                let (view, ids) = tree_view(&tree);
                prop_assert_eq!(&view, &model_view(&model));
                prop_assert_eq!(same_groups(&model, &ids), Ok(()));
            }
            (Err(_), Err(e)) => {
                prop_assert!(e.contains("hard link target"), "unexpected error {}", e);
            }
            (Ok(()), Err(e)) => prop_assert!(false, "model merged, fledge failed: {}", e),
            (Err(e), Ok(tree)) => {
                let (view, _) = tree_view(&tree);
                prop_assert!(false, "model failed ({}), fledge merged: {:?}", e, view);
            }
        }
    }

    #[test]
    fn frozen_trees_keep_their_invariants(stack in stack()) {
        if let Ok(tree) = merge(&stack) {
            prop_assert_eq!(check_freeze_invariants(&tree), Ok(()));
        }
    }
}
