//! The mutable tree the merge writes into, and its conversion into a frozen [`Tree`].

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::sync::Arc;

use crate::tree::{Meta, Node, NodeId, NodeKind, Tree, ROOT};

use super::{lossy, MergeError};

/// How many symlinks one path resolution may follow before giving up (Linux uses 40 too).
pub(super) const MAX_SYMLINK_FOLLOWS: u32 = 40;

/// Longest single path component accepted (`NAME_MAX`).
pub(super) const NAME_MAX: usize = 255;

/// Up to this many children a directory keeps them in a sorted `Vec`, beyond it in a B-tree.
const SMALL_DIR: usize = 256;

/// The children of a builder directory, sorted by raw name, unique names.
///
/// Nearly every directory is small: its children are a sorted `Vec`, the very `Vec` the
/// frozen tree's directory then holds (so freezing allocates and frees nothing for it,
/// and leaves no freed B-tree nodes scattered among the names). A directory that grows past
/// [`SMALL_DIR`] entries moves to a B-tree, since inserting into a sorted `Vec` in random
/// (hash) order would make a huge directory quadratic.
#[derive(Debug)]
enum Children {
    Small(Vec<(Box<[u8]>, NodeId)>),
    Large(BTreeMap<Box<[u8]>, NodeId>),
}

impl Default for Children {
    fn default() -> Self {
        Children::Small(Vec::new())
    }
}

impl Children {
    fn get(&self, name: &[u8]) -> Option<NodeId> {
        match self {
            Children::Small(v) => v
                .binary_search_by(|(n, _)| n.as_ref().cmp(name))
                .ok()
                .map(|i| v[i].1),
            Children::Large(m) => m.get(name).copied(),
        }
    }

    /// Point `name` at `id`, replacing what it named.
    fn set(&mut self, name: &[u8], id: NodeId) {
        match self {
            Children::Small(v) => match v.binary_search_by(|(n, _)| n.as_ref().cmp(name)) {
                Ok(i) => v[i].1 = id,
                Err(_) if v.len() >= SMALL_DIR => {
                    let mut m: BTreeMap<Box<[u8]>, NodeId> =
                        std::mem::take(v).into_iter().collect();
                    m.insert(name.into(), id);
                    *self = Children::Large(m);
                }
                Err(i) => v.insert(i, (name.into(), id)),
            },
            Children::Large(m) => match m.get_mut(name) {
                Some(slot) => *slot = id,
                None => {
                    m.insert(name.into(), id);
                }
            },
        }
    }

    /// Remove `name`; whether it was there.
    fn remove(&mut self, name: &[u8]) -> bool {
        match self {
            Children::Small(v) => match v.binary_search_by(|(n, _)| n.as_ref().cmp(name)) {
                Ok(i) => {
                    v.remove(i);
                    true
                }
                Err(_) => false,
            },
            Children::Large(m) => m.remove(name).is_some(),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Children::Small(v) => v.is_empty(),
            Children::Large(m) => m.is_empty(),
        }
    }

    /// The children sorted by name.
    fn into_sorted(self) -> Vec<(Box<[u8]>, NodeId)> {
        match self {
            Children::Small(v) => v,
            Children::Large(m) => m.into_iter().collect(),
        }
    }
}

/// Why a path could not be resolved (mapped by callers onto a [`MergeError`] naming the
/// entry).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ResolveError {
    /// More than [`MAX_SYMLINK_FOLLOWS`] symlinks followed.
    SymlinkLoop,
    /// The path nests deeper than [`MAX_DEPTH`] directories.
    TooDeep,
}

/// Deepest directory nesting accepted: a path of `PATH_MAX` (4096) bytes holds at most 2048
/// components, and keeping trees this shallow lets consumers walk them recursively.
pub(super) const MAX_DEPTH: usize = 2048;

/// The metadata of directories nobody described: 0755, root:root, mtime at the epoch.
pub fn implicit_dir_meta() -> Meta {
    Meta {
        mode: 0o755,
        ..Meta::default()
    }
}

/// Split a raw entry name into cleaned components: leading `/` and `./` dropped, `.` removed,
/// `..` applied lexically and clamped at the root. An empty result means the root itself.
pub(super) fn clean_components(path: &[u8]) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    for comp in path.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            name => out.push(name),
        }
    }
    out
}

/// A mutable image tree. Nodes are never freed while building: replaced or removed nodes just
/// become unreachable and are dropped by [`TreeBuilder::freeze`].
///
/// The nodes are the frozen tree's own [`Node`]s (directories with empty `entries` until the
/// freeze), and the children of directories live beside them, so that freezing reorders the
/// nodes in place instead of building a second tree next to the first: at a million
/// entries the two would not fit the memory a build is meant to take.
#[derive(Debug)]
pub struct TreeBuilder {
    nodes: Vec<Node>,
    /// The children of every directory node, by node id.
    dirs: HashMap<NodeId, Children>,
    /// Tar entries read so far, over all layers (see [`TreeBuilder::set_max_entries`]).
    pub(super) entries_read: usize,
    pub(super) max_entries: usize,
}

/// Default for [`TreeBuilder::set_max_entries`]: far above real images (the largest have
/// one or two million files) and low enough that a layer made of nothing but headers (a
/// few MiB of gzip can hold millions) cannot take more than about 1.3 GiB of memory (the
/// merge peaks near 160 bytes per entry).
pub const MAX_ENTRIES: usize = 1 << 23;

impl Default for TreeBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl TreeBuilder {
    /// An empty tree: just the root directory (0755, root:root, mtime 0).
    pub fn new() -> Self {
        TreeBuilder {
            nodes: vec![new_node(
                NodeKind::Dir {
                    entries: Vec::new(),
                },
                implicit_dir_meta(),
            )],
            dirs: HashMap::from([(ROOT, Children::default())]),
            entries_read: 0,
            max_entries: MAX_ENTRIES,
        }
    }

    /// Refuse images with more than `max` tar entries in all (default [`MAX_ENTRIES`]):
    /// memory grows with the number of entries, and a layer can hold millions of empty
    /// headers while its blob stays small.
    pub fn set_max_entries(&mut self, max: usize) {
        self.max_entries = max;
    }

    /// Whether the root has no entries (nothing a whiteout could hide).
    pub(super) fn is_empty(&self) -> bool {
        self.children(ROOT).is_none_or(|c| c.is_empty())
    }

    /// Number of nodes allocated so far (reachable or not).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the builder is close to the number of nodes a [`NodeId`] can index; callers
    /// refuse new entries then (one entry allocates at most a handful of nodes per path
    /// component, so the margin is generous).
    pub(super) fn is_full(&self) -> bool {
        self.nodes.len() >= (NodeId::MAX / 2) as usize
    }

    fn alloc(&mut self, kind: NodeKind, meta: Meta) -> NodeId {
        // Callers check `is_full` before each entry, so the id always fits.
        let id = NodeId::try_from(self.nodes.len()).unwrap_or(NodeId::MAX);
        if matches!(kind, NodeKind::Dir { .. }) {
            self.dirs.insert(id, Children::default());
        }
        self.nodes.push(new_node(kind, meta));
        id
    }

    fn alloc_dir(&mut self, meta: Meta) -> NodeId {
        self.alloc(
            NodeKind::Dir {
                entries: Vec::new(),
            },
            meta,
        )
    }

    fn children(&self, dir: NodeId) -> Option<&Children> {
        self.dirs.get(&dir)
    }

    fn children_mut(&mut self, dir: NodeId) -> Option<&mut Children> {
        self.dirs.get_mut(&dir)
    }

    fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        self.children(dir)?.get(name)
    }

    fn is_dir(&self, id: NodeId) -> bool {
        matches!(
            self.nodes.get(id as usize).map(|n| &n.kind),
            Some(NodeKind::Dir { .. })
        )
    }

    /// Point `dir/name` at `id`, replacing whatever was there.
    fn set_child(&mut self, dir: NodeId, name: &[u8], id: NodeId) {
        if let Some(children) = self.children_mut(dir) {
            children.set(name, id);
        }
    }

    /// Resolve the directory that holds the last of `comps`, following symlinks met on the
    /// way inside the tree (absolute targets start at the image root, `..` is clamped at the
    /// root). With `create`, missing directories are created with implicit metadata and
    /// non-directories in the way are replaced by implicit directories; without it, such a
    /// path resolves to `None`. An empty `comps` resolves to `None`.
    pub(super) fn resolve_parent(
        &mut self,
        comps: &[&[u8]],
        create: bool,
    ) -> Result<Option<NodeId>, ResolveError> {
        let Some((_, parents)) = comps.split_last() else {
            return Ok(None);
        };
        let mut walker = Walker::new(parents);
        loop {
            match walker.step(self)? {
                Step::Done(dir) => return Ok(Some(dir)),
                Step::Blocked(at, name) if create => {
                    let dir = self.alloc_dir(implicit_dir_meta());
                    self.set_child(at, &name, dir);
                    walker.push(dir)?;
                }
                Step::Blocked(..) => return Ok(None),
            }
        }
    }

    /// Resolve a cleaned path to the node it names without following its last component and
    /// without changing anything.
    pub(super) fn lookup_path(&self, comps: &[&[u8]]) -> Result<Option<NodeId>, ResolveError> {
        let Some((leaf, parents)) = comps.split_last() else {
            return Ok(Some(ROOT));
        };
        match Walker::new(parents).step(self)? {
            Step::Done(dir) => Ok(self.lookup(dir, leaf)),
            Step::Blocked(..) => Ok(None),
        }
    }

    /// Put a new non-directory node at `parent/name`, replacing what is there.
    pub(super) fn put_leaf(&mut self, parent: NodeId, name: &[u8], kind: NodeKind, meta: Meta) {
        let id = self.alloc(kind, meta);
        self.set_child(parent, name, id);
    }

    /// Make `parent/name` a directory with `meta`: an existing directory keeps its children,
    /// anything else is replaced by a new empty directory.
    pub(super) fn put_dir(&mut self, parent: NodeId, name: &[u8], meta: Meta) -> NodeId {
        if let Some(existing) = self.lookup(parent, name) {
            if self.is_dir(existing) {
                self.nodes[existing as usize].meta = meta;
                return existing;
            }
        }
        let id = self.alloc_dir(meta);
        self.set_child(parent, name, id);
        id
    }

    /// Replace the root directory's metadata (children kept).
    pub(super) fn set_root_meta(&mut self, meta: Meta) {
        self.nodes[ROOT as usize].meta = meta;
    }

    /// Add another entry `parent/name` for existing node `target` (a hard link).
    pub(super) fn link(&mut self, parent: NodeId, name: &[u8], target: NodeId) {
        self.set_child(parent, name, target);
    }

    /// Whether `id` is a directory (false for unknown ids).
    pub(super) fn node_is_dir(&self, id: NodeId) -> bool {
        self.is_dir(id)
    }

    /// Remove `dir/name` (and with it a whole subtree); returns whether something was there.
    pub(super) fn remove_child(&mut self, dir: NodeId, name: &[u8]) -> bool {
        self.children_mut(dir)
            .map(|c| c.remove(name))
            .unwrap_or(false)
    }

    /// Remove every child of `dir` (an opaque directory); no-op for non-directories.
    pub(super) fn clear_dir(&mut self, dir: NodeId) {
        if let Some(c) = self.children_mut(dir) {
            *c = Children::default();
        }
    }

    // ---- injection API -------------------------------------------------------------------

    /// Put a non-directory at `path` (absolute or root-relative, raw bytes), replacing
    /// whatever is there (a directory there is removed with its subtree). Missing parents are
    /// created 0755 root:root; symlinks among the parents are followed inside the tree.
    pub fn insert(&mut self, path: &[u8], kind: NodeKind, meta: Meta) -> Result<(), MergeError> {
        if self.is_full() {
            return Err(inject_err(path, "too many nodes in the tree"));
        }
        if matches!(kind, NodeKind::Dir { .. }) {
            return Err(inject_err(
                path,
                "insert cannot create directories, use mkdir_all",
            ));
        }
        let comps = checked_components(path)?;
        let Some(leaf) = comps.last() else {
            return Err(inject_err(path, "cannot replace the root directory"));
        };
        let parent = self
            .resolve_parent(&comps, true)
            .map_err(|e| inject_resolve_err(path, e))?
            .ok_or_else(|| inject_err(path, "parent directory cannot be created"))?;
        let mut meta = meta;
        if matches!(kind, NodeKind::Symlink { .. }) {
            meta.mode = 0o777; // as on every Linux filesystem
        }
        self.put_leaf(parent, leaf, kind, meta);
        Ok(())
    }

    /// Create directory `path` and any missing parents (0755 root:root); the directory itself
    /// gets `meta`. An existing directory keeps its children and gets `meta`; a non-directory
    /// at `path` is replaced by an empty directory.
    pub fn mkdir_all(&mut self, path: &[u8], meta: Meta) -> Result<(), MergeError> {
        if self.is_full() {
            return Err(inject_err(path, "too many nodes in the tree"));
        }
        let comps = checked_components(path)?;
        let Some(leaf) = comps.last() else {
            self.set_root_meta(meta);
            return Ok(());
        };
        let parent = self
            .resolve_parent(&comps, true)
            .map_err(|e| inject_resolve_err(path, e))?
            .ok_or_else(|| inject_err(path, "parent directory cannot be created"))?;
        self.put_dir(parent, leaf, meta);
        Ok(())
    }

    /// Remove whatever is at `path` (a directory with its subtree); the last component is not
    /// followed. Returns whether something was removed. The root cannot be removed.
    pub fn remove(&mut self, path: &[u8]) -> Result<bool, MergeError> {
        let comps = checked_components(path)?;
        let Some(leaf) = comps.last() else {
            return Err(inject_err(path, "cannot remove the root directory"));
        };
        match self
            .resolve_parent(&comps, false)
            .map_err(|e| inject_resolve_err(path, e))?
        {
            Some(parent) => Ok(self.remove_child(parent, leaf)),
            None => Ok(false),
        }
    }

    /// Whether `path` names something (the last component is not followed; symlinks among
    /// the parents are, inside the tree). Paths that loop count as absent.
    pub fn exists(&self, path: &[u8]) -> bool {
        let comps = clean_components(path);
        if comps.is_empty() {
            return true;
        }
        self.lookup_path(&comps).ok().flatten().is_some()
    }

    /// Freeze into a [`Tree`]: unreachable nodes are dropped, ids renumbered densely in
    /// depth-first name order (root = 0), `nlink` and `parent` computed.
    ///
    /// The nodes are renumbered in place: a first walk gives every reachable node its new
    /// id (moving each directory's children into its `entries` as it goes, renumbered),
    /// then the nodes are swapped into their new positions and the unreachable ones cut
    /// off the end.
    pub fn freeze(self, layer_files: Vec<Arc<File>>) -> Tree {
        let TreeBuilder {
            mut nodes,
            mut dirs,
            ..
        } = self;
        const NONE: NodeId = NodeId::MAX;
        let mut new_id: Vec<NodeId> = vec![NONE; nodes.len()];
        // Old id of each new id, in new-id order.
        let mut order: Vec<NodeId> = Vec::new();
        new_id[ROOT as usize] = 0;
        order.push(ROOT);
        nodes[ROOT as usize].nlink = 2;
        nodes[ROOT as usize].parent = 0;

        struct Frame {
            /// The directory's old id and new id.
            old_dir: NodeId,
            new_dir: NodeId,
            /// Its entries, sorted; those before `next` already carry new ids.
            entries: Vec<(Box<[u8]>, NodeId)>,
            next: usize,
        }
        let frame =
            |old_dir: NodeId, new_dir: NodeId, dirs: &mut HashMap<NodeId, Children>| Frame {
                old_dir,
                new_dir,
                entries: dirs.remove(&old_dir).unwrap_or_default().into_sorted(),
                next: 0,
            };
        let mut stack = vec![frame(ROOT, 0, &mut dirs)];
        while let Some(top) = stack.last_mut() {
            let Some(entry) = top.entries.get_mut(top.next) else {
                // Directory finished: its entries, renumbered, are the frozen directory's.
                let Some(done) = stack.pop() else { break };
                if let NodeKind::Dir { entries } = &mut nodes[done.old_dir as usize].kind {
                    *entries = done.entries;
                    // In place (the tail is freed where it is).
                    entries.shrink_to_fit();
                }
                continue;
            };
            top.next += 1;
            let old_child = entry.1;
            let (old_parent, parent) = (top.old_dir, top.new_dir);
            let existing = new_id[old_child as usize];
            if existing != NONE {
                // Another entry of a hard-link group (directories are never shared).
                entry.1 = existing;
                nodes[old_child as usize].nlink += 1;
                continue;
            }
            let id = NodeId::try_from(order.len()).unwrap_or(NONE);
            new_id[old_child as usize] = id;
            order.push(old_child);
            entry.1 = id;
            let child = &mut nodes[old_child as usize];
            child.parent = parent;
            if matches!(child.kind, NodeKind::Dir { .. }) {
                child.nlink = 2;
                nodes[old_parent as usize].nlink += 1;
                stack.push(frame(old_child, id, &mut dirs));
            } else {
                child.nlink = 1;
            }
        }
        drop(dirs);
        drop(new_id);
        // Move every reachable node to its new id: `at[i]` is the old id of the node now at
        // index i, `pos[old]` where that node is now.
        let mut at: Vec<NodeId> = (0..nodes.len() as NodeId).collect();
        let mut pos: Vec<NodeId> = at.clone();
        for (new, &old) in order.iter().enumerate() {
            let cur = pos[old as usize] as usize;
            if cur != new {
                let displaced = at[new];
                nodes.swap(new, cur);
                at[cur] = displaced;
                pos[displaced as usize] = cur as NodeId;
                at[new] = old;
                pos[old as usize] = new as NodeId;
            }
        }
        nodes.truncate(order.len());
        nodes.shrink_to_fit();
        Tree { nodes, layer_files }
    }
}

fn new_node(kind: NodeKind, meta: Meta) -> Node {
    Node {
        kind,
        meta,
        nlink: 1,
        parent: ROOT,
    }
}

/// An in-progress walk through parent directories (see [`TreeBuilder::resolve_parent`]).
struct Walker<'p> {
    /// Components still to walk, in reverse order (popped from the end).
    pending: Vec<Cow<'p, [u8]>>,
    /// The directories walked so far; `..` pops, clamped at the root.
    stack: Vec<NodeId>,
    follows: u32,
}

enum Step {
    /// Every component walked; the directory reached.
    Done(NodeId),
    /// `dir/name` is missing or not a directory (the walk can resume once the caller pushes
    /// a directory for it onto `stack`).
    Blocked(NodeId, Box<[u8]>),
}

impl<'p> Walker<'p> {
    fn new(parents: &[&'p [u8]]) -> Self {
        Walker {
            pending: parents.iter().rev().map(|c| Cow::Borrowed(*c)).collect(),
            stack: vec![ROOT],
            follows: 0,
        }
    }

    fn push(&mut self, dir: NodeId) -> Result<(), ResolveError> {
        if self.stack.len() > MAX_DEPTH {
            return Err(ResolveError::TooDeep);
        }
        self.stack.push(dir);
        Ok(())
    }

    fn step(&mut self, b: &TreeBuilder) -> Result<Step, ResolveError> {
        while let Some(comp) = self.pending.pop() {
            let cur = *self.stack.last().unwrap_or(&ROOT);
            match comp.as_ref() {
                b"" | b"." => continue,
                b".." => {
                    if self.stack.len() > 1 {
                        self.stack.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let Some(child) = b.lookup(cur, &comp) else {
                return Ok(Step::Blocked(cur, comp.as_ref().into()));
            };
            match &b.nodes[child as usize].kind {
                NodeKind::Dir { .. } => self.push(child)?,
                NodeKind::Symlink { target } if !target.is_empty() => {
                    self.follows += 1;
                    if self.follows > MAX_SYMLINK_FOLLOWS {
                        return Err(ResolveError::SymlinkLoop);
                    }
                    if target.first() == Some(&b'/') {
                        self.stack.truncate(1);
                    }
                    for part in target.split(|&c| c == b'/').rev() {
                        self.pending.push(Cow::Owned(part.to_vec()));
                    }
                }
                _ => return Ok(Step::Blocked(cur, comp.as_ref().into())),
            }
        }
        Ok(Step::Done(*self.stack.last().unwrap_or(&ROOT)))
    }
}

fn checked_components(path: &[u8]) -> Result<Vec<&[u8]>, MergeError> {
    let comps = clean_components(path);
    if let Some(long) = comps.iter().find(|c| c.len() > NAME_MAX) {
        return Err(inject_err(
            path,
            &format!("path component of {} bytes exceeds {NAME_MAX}", long.len()),
        ));
    }
    Ok(comps)
}

fn inject_err(path: &[u8], reason: &str) -> MergeError {
    MergeError::Inject {
        path: lossy(path),
        reason: reason.to_string(),
    }
}

fn inject_resolve_err(path: &[u8], e: ResolveError) -> MergeError {
    match e {
        ResolveError::SymlinkLoop => inject_err(path, "too many levels of symbolic links"),
        ResolveError::TooDeep => inject_err(
            path,
            &format!("path nests deeper than {MAX_DEPTH} directories"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_behave_as_a_sorted_map_small_and_large() {
        enum Op {
            Set(u32, NodeId),
            Remove(u32),
        }
        // Names in a scrambled order, so that inserts land anywhere; each case ends with
        // more or fewer than SMALL_DIR children.
        let name = |k: u32| format!("n{:05}", (k * 7919) % 10007).into_bytes();
        let n = SMALL_DIR as u32;
        let cases: Vec<(&str, Vec<Op>)> = vec![
            ("empty", vec![]),
            ("a few", (0..5).map(|k| Op::Set(k, k)).collect()),
            (
                "replace and remove",
                vec![
                    Op::Set(1, 1),
                    Op::Set(2, 2),
                    Op::Set(1, 9),
                    Op::Remove(2),
                    Op::Remove(3),
                ],
            ),
            ("exactly small", (0..n).map(|k| Op::Set(k, k)).collect()),
            ("grows large", (0..n * 3).map(|k| Op::Set(k, k)).collect()),
            (
                "large, then replaced and removed",
                (0..n * 2)
                    .map(|k| Op::Set(k, k))
                    .chain((0..n * 2).step_by(3).map(Op::Remove))
                    .chain((0..n).step_by(5).map(|k| Op::Set(k, k + 1_000_000)))
                    .collect(),
            ),
        ];
        for (what, ops) in cases {
            let mut c = Children::default();
            let mut model: BTreeMap<Vec<u8>, NodeId> = BTreeMap::new();
            for op in &ops {
                match *op {
                    Op::Set(k, id) => {
                        c.set(&name(k), id);
                        model.insert(name(k), id);
                    }
                    Op::Remove(k) => {
                        assert_eq!(
                            c.remove(&name(k)),
                            model.remove(&name(k)).is_some(),
                            "{what}"
                        );
                    }
                }
                assert_eq!(c.is_empty(), model.is_empty(), "{what}");
            }
            for k in 0..n * 3 {
                assert_eq!(c.get(&name(k)), model.get(&name(k)).copied(), "{what}: {k}");
            }
            let large = matches!(c, Children::Large(_));
            assert_eq!(
                large,
                ops.len() > SMALL_DIR && model.len() > n as usize / 2,
                "{what}"
            );
            let got: Vec<(Vec<u8>, NodeId)> = c
                .into_sorted()
                .into_iter()
                .map(|(k, v)| (k.into_vec(), v))
                .collect();
            assert_eq!(got, model.into_iter().collect::<Vec<_>>(), "{what}");
        }
    }
}
