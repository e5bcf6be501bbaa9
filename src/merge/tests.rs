//! Table-driven tests: layers are built in memory, merged, and the tree rendered into a
//! canonical listing compared line by line.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;

use super::tarread::{numeric, parse_pax, parse_pax_time};
use super::*;
use crate::testkit::{tar, Layer, LayoutBuilder, RawEntry, OCI_MANIFEST};
use crate::tree::{NodeId, Timestamp, ROOT};

// ---- layer construction ---------------------------------------------------------------------

#[derive(Clone, Debug)]
enum K {
    File(Vec<u8>),
    Dir,
    Sym(Vec<u8>),
    Hard(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
    /// Any type flag, no data.
    Raw(u8),
}

#[derive(Clone, Debug)]
struct E {
    path: Vec<u8>,
    kind: K,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    /// Extra PAX records, written before the entry (xattrs, mtime, ...).
    pax: Vec<(String, Vec<u8>)>,
}

fn e(path: impl AsRef<[u8]>, kind: K, mode: u32) -> E {
    E {
        path: path.as_ref().to_vec(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime: 0,
        pax: vec![],
    }
}
fn f(path: impl AsRef<[u8]>, data: impl AsRef<[u8]>) -> E {
    e(path, K::File(data.as_ref().to_vec()), 0o644)
}
fn d(path: impl AsRef<[u8]>) -> E {
    e(path, K::Dir, 0o755)
}
fn l(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> E {
    e(path, K::Sym(target.as_ref().to_vec()), 0o777)
}
fn h(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> E {
    e(path, K::Hard(target.as_ref().to_vec()), 0o644)
}
fn wh(path: impl AsRef<[u8]>) -> E {
    e(path, K::File(vec![]), 0o644)
}

impl E {
    fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
    fn mtime(mut self, t: u64) -> Self {
        self.mtime = t;
        self
    }
    fn pax(mut self, key: &str, value: impl AsRef<[u8]>) -> Self {
        self.pax.push((key.to_string(), value.as_ref().to_vec()));
        self
    }
    fn xattr(self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.pax(&format!("SCHILY.xattr.{name}"), value)
    }
}

/// The kit's tar writer, given `entries`.
fn layer_bytes(entries: &[E]) -> Vec<u8> {
    let raw: Vec<RawEntry> = entries
        .iter()
        .map(|ent| {
            let (typeflag, data, link, dev) = match &ent.kind {
                K::File(data) => (b'0', data.clone(), vec![], (0, 0)),
                K::Dir => (b'5', vec![], vec![], (0, 0)),
                K::Sym(t) => (b'2', vec![], t.clone(), (0, 0)),
                K::Hard(t) => (b'1', vec![], t.clone(), (0, 0)),
                K::Char(ma, mi) => (b'3', vec![], vec![], (*ma, *mi)),
                K::Block(ma, mi) => (b'4', vec![], vec![], (*ma, *mi)),
                K::Fifo => (b'6', vec![], vec![], (0, 0)),
                K::Raw(t) => (*t, vec![], vec![], (0, 0)),
            };
            RawEntry {
                data,
                link,
                uid: ent.uid,
                gid: ent.gid,
                mtime: ent.mtime,
                dev,
                pax: ent
                    .pax
                    .iter()
                    .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
                    .collect(),
                ..RawEntry::new(&ent.path, typeflag, ent.mode)
            }
        })
        .collect();
    tar(&raw)
}

fn to_file(bytes: &[u8]) -> File {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(bytes).unwrap();
    // The reader must not depend on the cursor.
    file.seek(SeekFrom::Start(7.min(bytes.len() as u64)))
        .unwrap();
    file
}

fn merge(layers: &[Vec<E>]) -> Result<Tree, MergeError> {
    merge_layers(layers.iter().map(|l| to_file(&layer_bytes(l))).collect())
}

// ---- rendering ------------------------------------------------------------------------------

fn esc(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

fn read_all(tree: &Tree, id: NodeId) -> Vec<u8> {
    let size = tree.node(id).size();
    let mut buf = vec![0u8; size as usize];
    let mut done = 0;
    while done < buf.len() {
        let n = tree.read_at(id, done as u64, &mut buf[done..]).unwrap();
        assert!(n > 0, "short read");
        done += n;
    }
    buf
}

/// One line per path: `path type mode uid:gid @mtime [details] [x:name=hex...] n=nlink
/// [grp=first-path]`.
fn render(tree: &Tree) -> String {
    check_invariants(tree);
    let mut paths: Vec<(Vec<u8>, NodeId)> = Vec::new();
    tree.walk(|p, id| paths.push((p.to_vec(), id)));
    let mut first: HashMap<NodeId, Vec<u8>> = HashMap::new();
    for (p, id) in &paths {
        first.entry(*id).or_insert_with(|| p.clone());
    }
    let mut out = Vec::new();
    for (p, id) in &paths {
        let n = tree.node(*id);
        let (ty, detail) = match &n.kind {
            NodeKind::Dir { .. } => ('d', String::new()),
            NodeKind::File { .. } => ('f', format!(" ={}", esc(&read_all(tree, *id)))),
            NodeKind::Symlink { target } => ('l', format!(" ->{}", esc(target))),
            NodeKind::CharDevice { major, minor } => ('c', format!(" {major},{minor}")),
            NodeKind::BlockDevice { major, minor } => ('b', format!(" {major},{minor}")),
            NodeKind::Fifo => ('p', String::new()),
        };
        let m = &n.meta;
        let mut line = format!(
            "{} {ty} {:o} {}:{} @{}",
            esc(p),
            m.mode,
            m.uid,
            m.gid,
            m.mtime.sec
        );
        if m.mtime.nsec != 0 {
            line += &format!(".{:09}", m.mtime.nsec);
        }
        line += &detail;
        for (name, value) in &m.xattrs {
            line += &format!(" x:{}={}", esc(name), hex::encode(value));
        }
        line += &format!(" n={}", n.nlink);
        if ty != 'd' && n.nlink > 1 {
            line += &format!(" grp={}", esc(&first[id]));
        }
        out.push(line);
    }
    out.join("\n")
}

/// Structural invariants every frozen tree must satisfy.
fn check_invariants(tree: &Tree) {
    let mut links = vec![0u32; tree.nodes.len()];
    // The parent is the directory of the first path (in walk order) reaching a node.
    let mut parent_of: Vec<Option<NodeId>> = vec![None; tree.nodes.len()];
    let mut order = Vec::new();
    tree.walk(|p, id| {
        order.push(id);
        if parent_of[id as usize].is_none() {
            let cut = p.iter().rposition(|&b| b == b'/').unwrap_or(0);
            let dir = std::ffi::OsStr::from_bytes(&p[..cut.max(1)]);
            parent_of[id as usize] = tree.resolve(std::path::Path::new(dir));
        }
    });
    for node in &tree.nodes {
        if let NodeKind::Dir { entries } = &node.kind {
            assert!(
                entries.windows(2).all(|w| w[0].0 < w[1].0),
                "entries sorted and unique"
            );
            for (name, child) in entries {
                assert!(!name.is_empty() && !name.contains(&b'/'));
                links[*child as usize] += 1;
            }
        }
    }
    // Ids are dense and assigned in walk (depth-first, name) order of first appearance.
    let mut seen = vec![false; tree.nodes.len()];
    let mut next = 0;
    for id in order {
        if !seen[id as usize] {
            assert_eq!(id, next, "ids follow depth-first name order");
            seen[id as usize] = true;
            next += 1;
        }
    }
    assert_eq!(next as usize, tree.nodes.len(), "every node reachable");
    for (id, node) in tree.nodes.iter().enumerate() {
        match &node.kind {
            NodeKind::Dir { entries } => {
                let subdirs = entries
                    .iter()
                    .filter(|(_, c)| matches!(tree.node(*c).kind, NodeKind::Dir { .. }))
                    .count() as u32;
                assert_eq!(node.nlink, 2 + subdirs, "dir nlink of node {id}");
                if id != 0 {
                    assert_eq!(links[id], 1, "directories have one entry");
                }
            }
            _ => assert_eq!(node.nlink, links[id], "nlink of node {id}"),
        }
        let want_parent = if id == 0 {
            ROOT
        } else {
            parent_of[id].unwrap()
        };
        assert_eq!(node.parent, want_parent, "parent of node {id}");
    }
}

// ---- the table ------------------------------------------------------------------------------

const ROOT_LINE: &str = "/ d 755 0:0 @0";

fn long(c: char, n: usize) -> String {
    std::iter::repeat_n(c, n).collect()
}

/// (name, layers, expected listing lines)
type Case = (&'static str, Vec<Vec<E>>, Vec<String>);

fn cases() -> Vec<Case> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let name200 = long('n', 200);
    let path150 = format!("{}/{}/leaf", long('a', 70), long('b', 70));
    let target300 = format!("/{}/{}/{}", long('x', 99), long('y', 99), long('z', 99));
    let cap: Vec<u8> = vec![
        0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    vec![
        (
            "whiteout of a file",
            vec![vec![f("a", "1"), f("b", "2")], vec![wh(".wh.a")]],
            s(&[&format!("{ROOT_LINE} n=2"), "/b f 644 0:0 @0 =2 n=1"]),
        ),
        (
            "whiteout of a directory subtree",
            vec![
                vec![d("d"), f("d/x", "x"), d("d/s"), f("d/s/y", "y"), f("keep", "k")],
                vec![wh("./.wh.d")],
            ],
            s(&[&format!("{ROOT_LINE} n=2"), "/keep f 644 0:0 @0 =k n=1"]),
        ),
        (
            "opaque directory hides lower children, keeps same-layer ones",
            vec![
                vec![
                    d("d").mtime(5),
                    f("d/old", "o"),
                    d("d/sub"),
                    f("d/sub/z", "z"),
                ],
                vec![f("d/new", "n"), wh("d/.wh..wh..opq"), f("d/new2", "m")],
            ],
            s(&[
                &format!("{ROOT_LINE} n=3"),
                "/d d 755 0:0 @5 n=2",
                "/d/new f 644 0:0 @0 =n n=1",
                "/d/new2 f 644 0:0 @0 =m n=1",
            ]),
        ),
        (
            "whiteout never hides an entry of its own layer",
            vec![
                vec![f("a", "low")],
                vec![f("a", "new"), wh(".wh.a"), f("b", "b"), wh(".wh.b")],
            ],
            s(&[
                &format!("{ROOT_LINE} n=2"),
                "/a f 644 0:0 @0 =new n=1",
                "/b f 644 0:0 @0 =b n=1",
            ]),
        ),
        (
            "whiteout of something absent is a no-op and creates no parents",
            vec![
                vec![f("a", "a")],
                vec![wh("no/such/.wh.x"), wh(".wh.zz"), wh("a/.wh.b"), wh("q/.wh..wh..opq")],
            ],
            s(&[&format!("{ROOT_LINE} n=2"), "/a f 644 0:0 @0 =a n=1"]),
        ),
        (
            "aufs metadata is skipped",
            vec![vec![
                d(".wh..wh.plnk"),
                f(".wh..wh.plnk/123.456", "x"),
                f(".wh..wh.aufs", ""),
                f("a", "a"),
            ]],
            s(&[&format!("{ROOT_LINE} n=2"), "/a f 644 0:0 @0 =a n=1"]),
        ),
        (
            "file replaced by a directory",
            vec![vec![f("x", "f")], vec![d("x").mode(0o750), f("x/y", "y")]],
            s(&[
                &format!("{ROOT_LINE} n=3"),
                "/x d 750 0:0 @0 n=2",
                "/x/y f 644 0:0 @0 =y n=1",
            ]),
        ),
        (
            "directory replaced by a file drops the subtree",
            vec![
                vec![d("x"), f("x/y", "y"), d("x/z")],
                vec![f("x", "now a file")],
            ],
            s(&[&format!("{ROOT_LINE} n=2"), "/x f 644 0:0 @0 =now\\x20a\\x20file n=1"]
                .map(|l| l.replace("\\x20", " "))
                .iter()
                .map(|x| x.as_str())
                .collect::<Vec<_>>()),
        ),
        (
            "directory metadata update keeps the children",
            vec![
                vec![d("x").mtime(10), f("x/y", "y"), d("x/s")],
                vec![d("x").mode(0o700).owner(5, 6).mtime(20).xattr("user.a", "1")],
            ],
            s(&[
                &format!("{ROOT_LINE} n=3"),
                "/x d 700 5:6 @20 x:user.a=31 n=3",
                "/x/s d 755 0:0 @0 n=2",
                "/x/y f 644 0:0 @0 =y n=1",
            ]),
        ),
        (
            "hard link into a lower layer",
            vec![
                vec![f("a", "data").mode(0o600).owner(1, 2)],
                vec![d("dir"), h("dir/b", "a")],
            ],
            s(&[
                &format!("{ROOT_LINE} n=3"),
                "/a f 600 1:2 @0 =data n=2 grp=/a",
                "/dir d 755 0:0 @0 n=2",
                "/dir/b f 600 1:2 @0 =data n=2 grp=/a",
            ]),
        ),
        (
            "replacing one path of a link group leaves the others",
            vec![
                vec![f("a", "old"), h("b", "a"), h("./c", "/a")],
                vec![f("a", "new")],
            ],
            s(&[
                &format!("{ROOT_LINE} n=2"),
                "/a f 644 0:0 @0 =new n=1",
                "/b f 644 0:0 @0 =old n=2 grp=/b",
                "/c f 644 0:0 @0 =old n=2 grp=/b",
            ]),
        ),
        (
            "whiteout of one path of a link group",
            vec![vec![f("a", "x"), h("b", "a")], vec![wh(".wh.a")]],
            s(&[&format!("{ROOT_LINE} n=2"), "/b f 644 0:0 @0 =x n=1"]),
        ),
        (
            "hard links to a symlink, a device and a fifo",
            vec![vec![
                l("s", "tgt"),
                h("s2", "s"),
                e("dev", K::Char(1, 2), 0o600),
                h("dev2", "dev"),
                e("p", K::Fifo, 0o600),
                h("p2", "p"),
            ]],
            s(&[
                &format!("{ROOT_LINE} n=2"),
                "/dev c 600 0:0 @0 1,2 n=2 grp=/dev",
                "/dev2 c 600 0:0 @0 1,2 n=2 grp=/dev",
                "/p p 600 0:0 @0 n=2 grp=/p",
                "/p2 p 600 0:0 @0 n=2 grp=/p",
                "/s l 777 0:0 @0 ->tgt n=2 grp=/s",
                "/s2 l 777 0:0 @0 ->tgt n=2 grp=/s",
            ]),
        ),
        (
            "entries before their parent: implicit parent, later header updates it",
            vec![vec![
                f("x/y/z", "z"),
                d("x/y").mode(0o700).owner(3, 4).mtime(50),
            ]],
            s(&[
                &format!("{ROOT_LINE} n=3"),
                "/x d 755 0:0 @0 n=3",
                "/x/y d 700 3:4 @50 n=2",
                "/x/y/z f 644 0:0 @0 =z n=1",
            ]),
        ),
        (
            "a non-directory parent is replaced by an implicit directory",
            vec![vec![f("x", "file")], vec![f("x/y", "y")]],
            s(&[
                &format!("{ROOT_LINE} n=3"),
                "/x d 755 0:0 @0 n=2",
                "/x/y f 644 0:0 @0 =y n=1",
            ]),
        ),
        (
            "binary xattr values and security.capability (empty values dropped)",
            vec![vec![f("bin/ping", "elf")
                .mode(0o755)
                .xattr("user.bin", [0x00, 0xff, 0x0a, b'=', b' ', 0x01])
                .xattr("security.capability", &cap)
                .xattr("trusted.a", "")]],
            s(&[
                &format!("{ROOT_LINE} n=3"),
                "/bin d 755 0:0 @0 n=2",
                &format!(
                    "/bin/ping f 755 0:0 @0 =elf x:security.capability={} x:user.bin=00ff0a3d2001 n=1",
                    hex::encode(&cap)
                ),
            ]),
        ),
        (
            "character and block devices and a fifo",
            vec![vec![
                e("dev/null", K::Char(1, 3), 0o666),
                e("dev/loop0", K::Block(7, 0), 0o660).owner(0, 6),
                e("dev/big", K::Block(259, 65537), 0o600),
                e("run/fifo", K::Fifo, 0o600),
            ]],
            s(&[
                &format!("{ROOT_LINE} n=4"),
                "/dev d 755 0:0 @0 n=2",
                "/dev/big b 600 0:0 @0 259,65537 n=1",
                "/dev/loop0 b 660 0:6 @0 7,0 n=1",
                "/dev/null c 666 0:0 @0 1,3 n=1",
                "/run d 755 0:0 @0 n=2",
                "/run/fifo p 600 0:0 @0 n=1",
            ]),
        ),
        (
            "long names through pax path and linkpath",
            vec![vec![
                // The xattr's newline precedes the pax `path` record: both must survive.
                f(&path150, "deep").xattr("user.nl", "a\nb"),
                f(&name200, "wide"),
                l("sym", &target300),
                h("hl", &path150),
            ]],
            s(&[
                &format!("{ROOT_LINE} n=3"),
                &format!("/{} d 755 0:0 @0 n=3", long('a', 70)),
                &format!("/{}/{} d 755 0:0 @0 n=2", long('a', 70), long('b', 70)),
                &format!("/{path150} f 644 0:0 @0 =deep x:user.nl=610a62 n=2 grp=/{path150}"),
                &format!("/hl f 644 0:0 @0 =deep x:user.nl=610a62 n=2 grp=/{path150}"),
                &format!("/{name200} f 644 0:0 @0 =wide n=1"),
                &format!("/sym l 777 0:0 @0 ->{target300} n=1"),
            ]),
        ),
        (
            "odd names survive as raw bytes",
            vec![vec![
                f("with space", "1"),
                f("new\nline", "2"),
                f("back\\slash", "3"),
                f("-dash", "4"),
                f([0xff, 0xfe, b'x'], "5"),
                f(b"d\x01/\xe9t\xe9", "6"),
            ]],
            s(&[
                &format!("{ROOT_LINE} n=3"),
                "/-dash f 644 0:0 @0 =4 n=1",
                "/back\\\\slash f 644 0:0 @0 =3 n=1",
                "/d\\x01 d 755 0:0 @0 n=2",
                "/d\\x01/\\xe9t\\xe9 f 644 0:0 @0 =6 n=1",
                "/new\\nline f 644 0:0 @0 =2 n=1",
                "/with space f 644 0:0 @0 =1 n=1",
                "/\\xff\\xfex f 644 0:0 @0 =5 n=1",
            ]),
        ),
        (
            "large uid and gid",
            vec![vec![
                f("a", "").owner(70000, 3_000_000),
                f("b", "").owner(4_294_967_294, 65536),
            ]],
            s(&[
                &format!("{ROOT_LINE} n=2"),
                "/a f 644 70000:3000000 @0 = n=1",
                "/b f 644 4294967294:65536 @0 = n=1",
            ]),
        ),
        (
            "mtimes before 1970, fractional and after 2038",
            vec![vec![
                f("neg", "").pax("mtime", "-86400.5"),
                f("frac", "").pax("mtime", "1.5"),
                f("neg2", "").pax("mtime", "-123.25"),
                f("future", "").mtime(4_102_444_800),
                d("dir").mtime(7).pax("mtime", "4102444800.000000001"),
            ]],
            s(&[
                &format!("{ROOT_LINE} n=3"),
                "/dir d 755 0:0 @4102444800.000000001 n=2",
                "/frac f 644 0:0 @1.500000000 = n=1",
                "/future f 644 0:0 @4102444800 = n=1",
                "/neg f 644 0:0 @-86401.500000000 = n=1",
                "/neg2 f 644 0:0 @-124.750000000 = n=1",
            ]),
        ),
        (
            "setuid, setgid and sticky bits are kept",
            vec![vec![
                f("su", "").mode(0o4755),
                d("sg").mode(0o2775),
                d("tmp").mode(0o1777),
                f("all", "").mode(0o107777),
            ]],
            s(&[
                &format!("{ROOT_LINE} n=4"),
                "/all f 7777 0:0 @0 = n=1",
                "/sg d 2775 0:0 @0 n=2",
                "/su f 4755 0:0 @0 = n=1",
                "/tmp d 1777 0:0 @0 n=2",
            ]),
        ),
        (
            "dot-dot is clamped at the root and absolute names are relative to it",
            vec![vec![
                f("../../etc/x", "1"),
                f("a/../../b", "2"),
                f("./c/./d/../e", "3"),
                f("/abs/file", "4"),
                f("//abs//two", "5"),
                h("lnk", "../../../b"),
            ]],
            s(&[
                &format!("{ROOT_LINE} n=5"),
                "/abs d 755 0:0 @0 n=2",
                "/abs/file f 644 0:0 @0 =4 n=1",
                "/abs/two f 644 0:0 @0 =5 n=1",
                "/b f 644 0:0 @0 =2 n=2 grp=/b",
                "/c d 755 0:0 @0 n=2",
                "/c/e f 644 0:0 @0 =3 n=1",
                "/etc d 755 0:0 @0 n=2",
                "/etc/x f 644 0:0 @0 =1 n=1",
                "/lnk f 644 0:0 @0 =2 n=2 grp=/b",
            ]),
        ),
        (
            "symlinked parents are followed inside the tree (absolute targets)",
            vec![
                vec![
                    d("real"),
                    l("link", "/real"),
                    l("esc", "/../../outside"),
                    l("chain", "link"),
                ],
                vec![
                    f("link/f", "x"),
                    f("esc/h", "h"),
                    f("chain/g", "g"),
                    l("link", "/real"),
                ],
            ],
            s(&[
                &format!("{ROOT_LINE} n=4"),
                "/chain l 777 0:0 @0 ->link n=1",
                "/esc l 777 0:0 @0 ->/../../outside n=1",
                "/link l 777 0:0 @0 ->/real n=1",
                "/outside d 755 0:0 @0 n=2",
                "/outside/h f 644 0:0 @0 =h n=1",
                "/real d 755 0:0 @0 n=2",
                "/real/f f 644 0:0 @0 =x n=1",
                "/real/g f 644 0:0 @0 =g n=1",
            ]),
        ),
        (
            "symlinked parents are followed inside the tree (relative targets)",
            vec![vec![
                d("a/b"),
                l("a/l", "b"),
                l("a/up", "../c"),
                l("a/far", "../../../../../d"),
                l("a/dot", "./b/.."),
                f("a/l/x", "x"),
                f("a/up/y", "y"),
                f("a/far/z", "z"),
                f("a/dot/w", "w"),
            ]],
            s(&[
                &format!("{ROOT_LINE} n=5"),
                "/a d 755 0:0 @0 n=3",
                "/a/b d 755 0:0 @0 n=2",
                "/a/b/x f 644 0:0 @0 =x n=1",
                "/a/dot l 777 0:0 @0 ->./b/.. n=1",
                "/a/far l 777 0:0 @0 ->../../../../../d n=1",
                "/a/l l 777 0:0 @0 ->b n=1",
                "/a/up l 777 0:0 @0 ->../c n=1",
                "/a/w f 644 0:0 @0 =w n=1",
                "/c d 755 0:0 @0 n=2",
                "/c/y f 644 0:0 @0 =y n=1",
                "/d d 755 0:0 @0 n=2",
                "/d/z f 644 0:0 @0 =z n=1",
            ]),
        ),
        (
            "the leaf symlink is replaced, never followed",
            vec![vec![d("t"), f("t/f", "keep"), l("s", "t")], vec![f("s", "file")]],
            s(&[
                &format!("{ROOT_LINE} n=3"),
                "/s f 644 0:0 @0 =file n=1",
                "/t d 755 0:0 @0 n=2",
                "/t/f f 644 0:0 @0 =keep n=1",
            ]),
        ),
        (
            "symlinks are always 0777, whatever mode their header carries",
            vec![vec![l("s", "t").mode(0o644), l("u", "/abs").mode(0o600).owner(5, 6)]],
            s(&[
                &format!("{ROOT_LINE} n=2"),
                "/s l 777 0:0 @0 ->t n=1",
                "/u l 777 5:6 @0 ->/abs n=1",
            ]),
        ),
        (
            "root metadata from ./",
            vec![
                vec![f("a", "a"), d("./").mode(0o700).owner(1, 2).mtime(99)],
                vec![d(".").mode(0o750).xattr("user.r", "v").mtime(100)],
            ],
            s(&[
                "/ d 750 0:0 @100 x:user.r=76 n=2",
                "/a f 644 0:0 @0 =a n=1",
            ]),
        ),
        (
            "old-style regular entry with a trailing slash is a directory",
            vec![vec![e("olddir/", K::Raw(0), 0o711), e("x", K::Raw(0), 0o600)]],
            s(&[
                &format!("{ROOT_LINE} n=3"),
                "/olddir d 711 0:0 @0 n=2",
                "/x f 600 0:0 @0 = n=1",
            ]),
        ),
        (
            "unsupported entry types are skipped",
            vec![vec![e("vol", K::Raw(b'V'), 0o644), f("a", "a")]],
            s(&[&format!("{ROOT_LINE} n=2"), "/a f 644 0:0 @0 =a n=1"]),
        ),
        (
            "contiguous files are regular files",
            vec![vec![e("c", K::Raw(b'7'), 0o644)]],
            s(&[&format!("{ROOT_LINE} n=2"), "/c f 644 0:0 @0 = n=1"]),
        ),
        (
            "libarchive xattrs",
            vec![vec![f("a", "")
                .pax("LIBARCHIVE.xattr.user.with%20space%3D", "AP8KPQ==")
                .pax("LIBARCHIVE.xattr.user.plain", "aGk")]],
            s(&[
                &format!("{ROOT_LINE} n=2"),
                "/a f 644 0:0 @0 = x:user.plain=6869 x:user.with space==00ff0a3d n=1",
            ]),
        ),
        (
            "three-layer stack",
            vec![
                vec![
                    d("etc"),
                    f("etc/passwd", "root"),
                    f("etc/hosts", "h1"),
                    d("var/lib"),
                    f("var/lib/db", "db1"),
                    f("bin/sh", "sh"),
                    h("bin/bash", "bin/sh"),
                ],
                vec![
                    f("etc/hosts", "h2"),
                    wh("var/.wh.lib"),
                    wh("etc/.wh.passwd"),
                    f("bin/sh", "sh2"),
                ],
                vec![
                    f("etc/passwd", "root2"),
                    d("var/lib"),
                    f("var/lib/new", "n"),
                    wh("etc/.wh..wh..opq"),
                    f("etc/group", "g"),
                    wh("bin/.wh.sh"),
                ],
            ],
            s(&[
                &format!("{ROOT_LINE} n=5"),
                "/bin d 755 0:0 @0 n=2",
                "/bin/bash f 644 0:0 @0 =sh n=1",
                "/etc d 755 0:0 @0 n=2",
                "/etc/group f 644 0:0 @0 =g n=1",
                "/etc/passwd f 644 0:0 @0 =root2 n=1",
                "/var d 755 0:0 @0 n=3",
                "/var/lib d 755 0:0 @0 n=2",
                "/var/lib/new f 644 0:0 @0 =n n=1",
            ]),
        ),
    ]
}

#[test]
fn merge_cases() {
    let mut failures = Vec::new();
    for (name, layers, want) in cases() {
        match merge(&layers) {
            Ok(tree) => {
                let got = render(&tree);
                let want = want.join("\n");
                if got != want {
                    failures.push(format!("case {name:?}:\n--- want\n{want}\n--- got\n{got}"));
                }
            }
            Err(err) => failures.push(format!("case {name:?}: unexpected error: {err}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn error_cases() {
    let long_comp = long('q', 256);
    let loop_layers = vec![vec![l("a", "b"), l("b", "a"), f("a/x", "x")]];
    type ErrCase = (&'static str, Vec<Vec<E>>, &'static [&'static str]);
    let cases: Vec<ErrCase> = vec![
        (
            "hard link to a missing target",
            vec![vec![f("a", "")], vec![h("b", "nope")]],
            &[
                "layer 1",
                "tar entry b",
                "hard link target nope",
                "does not exist",
            ],
        ),
        (
            "hard link to a directory",
            vec![vec![d("dir"), h("b", "dir")]],
            &["layer 0", "tar entry b", "target dir", "is a directory"],
        ),
        (
            "hard link target removed by a whiteout of its own layer",
            vec![vec![f("a", "")], vec![wh(".wh.a"), h("b", "a")]],
            &["layer 1", "does not exist"],
        ),
        (
            "symlink loop among parents",
            loop_layers,
            &[
                "layer 0",
                "tar entry a/x",
                "too many levels of symbolic links",
            ],
        ),
        (
            "self-referencing symlink parent",
            vec![vec![l("s", "s/x"), f("s/y", "")]],
            &["tar entry s/y", "too many levels"],
        ),
        (
            "gnu sparse entry",
            vec![vec![f("ok", ""), e("sp", K::Raw(b'S'), 0o644)]],
            &[
                "layer 0",
                "tar entry sp",
                "sparse tar entries are not supported",
            ],
        ),
        (
            "pax sparse entry",
            vec![vec![f("sp2", "").pax("GNU.sparse.major", "1")]],
            &["tar entry sp2", "sparse tar entries are not supported"],
        ),
        (
            "path component longer than 255 bytes",
            vec![vec![f(format!("dir/{long_comp}"), "")]],
            &["layer 0", "tar entry dir/qqq", "256 bytes exceeds 255"],
        ),
        (
            "path nesting too deep",
            vec![vec![f("a/".repeat(2100), "")]],
            &["layer 0", "tar entry a/a/a", "deeper than 2048 directories"],
        ),
        (
            "symlinks nesting too deep",
            vec![vec![
                d("a/".repeat(1500)),
                l("s", "a/".repeat(1500)),
                f(format!("s/{}x", "b/".repeat(600)), ""),
            ]],
            &["tar entry s/b/b", "deeper than 2048 directories"],
        ),
        (
            "non-directory naming the root",
            vec![vec![f("./", "")]],
            &["tar entry ./", "cannot replace the root"],
        ),
        (
            "bad pax mtime",
            vec![vec![f("t", "").pax("mtime", "12x")]],
            &["tar entry t", "invalid pax mtime record"],
        ),
        (
            "NUL byte in a pax path",
            vec![vec![f("n", "").pax("path", b"etc/a\0b")]],
            &["layer 0", "tar entry etc/a", "name contains a NUL byte"],
        ),
        (
            "NUL byte in a pax link target",
            vec![vec![l("n", "x").pax("linkpath", b"/etc/\0")]],
            &["tar entry n", "link target contains a NUL byte"],
        ),
        (
            "uid beyond 32 bits",
            vec![vec![f("u", "").pax("uid", "4294967296")]],
            &["tar entry u", "uid 4294967296 out of range"],
        ),
    ];
    let mut failures = Vec::new();
    for (name, layers, want) in cases {
        match merge(&layers) {
            Ok(tree) => failures.push(format!("case {name:?}: merged:\n{}", render(&tree))),
            Err(err) => {
                let msg = err.to_string();
                for w in want {
                    if !msg.contains(w) {
                        failures.push(format!("case {name:?}: {msg:?} lacks {w:?}"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn entry_limit_counts_every_layer() {
    let layers = [
        layer_bytes(&[d("a"), f("a/x", "1"), wh(".wh.gone")]),
        layer_bytes(&[f("b", "2"), f("c", "3")]),
    ];
    let apply = |max: usize| {
        let mut b = TreeBuilder::new();
        b.set_max_entries(max);
        layers
            .iter()
            .enumerate()
            .try_for_each(|(i, l)| b.apply_layer(i as u32, &to_file(l)))
    };
    assert!(apply(5).is_ok());
    let msg = apply(4).unwrap_err().to_string();
    assert!(
        msg.contains("layer 1: tar entry c: the image has more than 4 tar entries"),
        "{msg}"
    );
    let msg = apply(2).unwrap_err().to_string();
    assert!(msg.contains("layer 0: tar entry .wh.gone"), "{msg}");
}

#[test]
fn error_variants() {
    let err = merge(&[vec![h("b", "a")]]).unwrap_err();
    assert!(
        matches!(err, MergeError::HardlinkTarget { layer: 0, .. }),
        "{err:?}"
    );
    let err = merge(&[vec![l("a", "a"), f("a/x", "")]]).unwrap_err();
    assert!(
        matches!(err, MergeError::SymlinkLoop { layer: 0, .. }),
        "{err:?}"
    );
    let err = merge(&[vec![], vec![e("s", K::Raw(b'S'), 0)]]).unwrap_err();
    assert!(
        matches!(err, MergeError::Sparse { layer: 1, .. }),
        "{err:?}"
    );
    let err = merge(&[vec![f(long('n', 256), "")]]).unwrap_err();
    assert!(
        matches!(err, MergeError::NameTooLong { len: 256, .. }),
        "{err:?}"
    );
}

#[test]
fn truncated_layer_is_an_error() {
    let mut bytes = layer_bytes(&[f("ok", "fine"), f("big", vec![7u8; 5000])]);
    // Keep the second header and 100 bytes of its data.
    bytes.truncate(512 + 512 + 512 + 100);
    let err = merge_layers(vec![to_file(&bytes)]).unwrap_err();
    match &err {
        MergeError::Truncated {
            layer: 0,
            entry,
            end,
            file_len,
        } => {
            assert_eq!(entry, "big");
            assert_eq!(*end, 512 * 3 + 5000);
            assert_eq!(*file_len, 512 * 3 + 100);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("tar entry big"), "{err}");

    // A header cut in the middle.
    let mut bytes = layer_bytes(&[f("ok", "fine"), f("next", "x")]);
    bytes.truncate(512 * 2 + 100);
    let err = merge_layers(vec![to_file(&bytes)]).unwrap_err();
    assert!(matches!(err, MergeError::Io { layer: 0, .. }), "{err:?}");
    assert!(err.to_string().contains("after tar entry ok"), "{err}");
}

#[test]
fn a_bad_entry_is_reported_before_what_earlier_entries_do() {
    // A hard link to nothing (an error applying it), then a truncated entry (an error
    // reading it): the layer is refused for the second, in the first layer (read and
    // applied in one pass) as in a later one (read twice).
    let mut bad = layer_bytes(&[
        f("ok", "fine"),
        h("dangling", "nope"),
        f("big", vec![7u8; 5000]),
    ]);
    bad.truncate(512 * 4 + 100);
    let lower = layer_bytes(&[f("lower", "x")]);
    for layers in [vec![bad.clone()], vec![lower, bad]] {
        let n = layers.len() as u32;
        let err = merge_layers(layers.iter().map(|l| to_file(l)).collect()).unwrap_err();
        assert!(
            matches!(&err, MergeError::Truncated { layer, entry, .. } if *layer == n - 1 && entry == "big"),
            "{n} layers: {err:?}"
        );
    }
    // Alone, the link is the error, in both cases.
    for layers in [
        vec![layer_bytes(&[h("dangling", "nope")])],
        vec![
            layer_bytes(&[f("lower", "x")]),
            layer_bytes(&[h("dangling", "nope")]),
        ],
    ] {
        let err = merge_layers(layers.iter().map(|l| to_file(l)).collect()).unwrap_err();
        assert!(matches!(err, MergeError::HardlinkTarget { .. }), "{err:?}");
    }
}

#[test]
fn corrupt_header_is_an_error() {
    let mut bytes = layer_bytes(&[f("a", "x"), f("b", "y")]);
    bytes[1024 + 10] ^= 0x55; // second header's name, checksum now wrong
    let err = merge_layers(vec![to_file(&bytes)]).unwrap_err();
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    assert!(
        matches!(err, MergeError::BadEntry { layer: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn empty_layer_and_no_layers() {
    let tree = merge_layers(vec![]).unwrap();
    assert_eq!(render(&tree), format!("{ROOT_LINE} n=2"));
    let tree = merge_layers(vec![to_file(&[]), to_file(&[0u8; 1024])]).unwrap();
    assert_eq!(tree.nodes.len(), 1);
    assert_eq!(tree.layer_files.len(), 2);
}

/// Archives written by the `tar` crate's own path handling: GNU long names and links, ustar
/// prefix splitting, global PAX headers.
#[test]
fn gnu_long_names_ustar_prefix_and_global_headers() {
    let deep = format!("{}/{}/file", long('p', 120), long('r', 30));
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("comment", &b"global"[..])])
        .unwrap();
    // Turn that (local) pax header into a global one.
    let mut hdr = tar::Header::from_byte_slice(&b.get_ref()[..512]).clone();
    hdr.set_entry_type(tar::EntryType::XGlobalHeader);
    hdr.set_cksum();
    b.get_mut()[..512].copy_from_slice(hdr.as_bytes());

    let mut gnu = tar::Header::new_gnu();
    gnu.set_size(4);
    gnu.set_mode(0o640);
    gnu.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut gnu, &deep, &b"data"[..]).unwrap();
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Link);
    link.set_mode(0o640);
    b.append_link(&mut link, "short", &deep).unwrap();

    let prefixed = format!("{}/{}/ustar-file", long('u', 60), long('v', 60));
    let mut us = tar::Header::new_ustar();
    us.set_path(&prefixed).unwrap();
    us.set_size(2);
    us.set_mode(0o600);
    us.set_entry_type(tar::EntryType::Regular);
    us.set_cksum();
    assert_ne!(
        us.as_ustar().unwrap().prefix[0],
        0,
        "test needs a ustar prefix"
    );
    b.append(&us, &b"us"[..]).unwrap();
    let bytes = b.into_inner().unwrap();

    let tree = merge_layers(vec![to_file(&bytes)]).unwrap();
    let got = render(&tree);
    let want = [
        format!("{ROOT_LINE} n=4"),
        format!("/{} d 755 0:0 @0 n=3", long('p', 120)),
        format!("/{} d 755 0:0 @0 n=2", &deep[..deep.len() - 5]),
        format!("/{deep} f 640 0:0 @0 =data n=2 grp=/{deep}"),
        format!("/short f 640 0:0 @0 =data n=2 grp=/{deep}"),
        format!("/{} d 755 0:0 @0 n=3", long('u', 60)),
        format!("/{}/{} d 755 0:0 @0 n=2", long('u', 60), long('v', 60)),
        format!("/{prefixed} f 600 0:0 @0 =us n=1"),
    ]
    .join("\n");
    assert_eq!(got, want);
}

/// A PAX `size` record overrides the header's size field, for the data and for where the next
/// header is.
#[test]
fn pax_size_overrides_the_header() {
    let mut b = tar::Builder::new(Vec::new());
    let data = vec![b'z'; 700];
    b.append_pax_extensions([("size", &b"700"[..])]).unwrap();
    let mut hdr = tar::Header::new_ustar();
    hdr.as_old_mut().name[..3].copy_from_slice(b"big");
    hdr.set_entry_type(tar::EntryType::Regular);
    hdr.set_mode(0o644);
    hdr.set_size(0);
    hdr.set_cksum();
    b.append(&hdr, &data[..]).unwrap();
    let mut next = tar::Header::new_ustar();
    next.as_old_mut().name[..4].copy_from_slice(b"next");
    next.set_entry_type(tar::EntryType::Regular);
    next.set_mode(0o600);
    next.set_size(2);
    next.set_cksum();
    b.append(&next, &b"ok"[..]).unwrap();
    let tree = merge_layers(vec![to_file(&b.into_inner().unwrap())]).unwrap();
    assert_eq!(
        render(&tree),
        format!(
            "{ROOT_LINE} n=2\n/big f 644 0:0 @0 ={} n=1\n/next f 600 0:0 @0 =ok n=1",
            "z".repeat(700)
        )
    );
}

#[test]
fn base256_header_fields() {
    let mut b = tar::Builder::new(Vec::new());
    let mut hdr = tar::Header::new_gnu();
    hdr.as_old_mut().name[..3].copy_from_slice(b"old");
    hdr.set_entry_type(tar::EntryType::Regular);
    hdr.set_mode(0o644);
    // mtime -86400 in GNU base-256 (two's complement, 0xff lead byte).
    let mut field = [0xffu8; 12];
    field[4..].copy_from_slice(&(-86400i64).to_be_bytes());
    hdr.as_old_mut().mtime = field;
    // uid 5_000_000 in base-256 (0x80 lead byte).
    let mut uid = [0u8; 8];
    uid[0] = 0x80;
    uid[4..].copy_from_slice(&5_000_000u32.to_be_bytes());
    hdr.as_old_mut().uid = uid;
    hdr.set_size(0);
    hdr.set_cksum();
    b.append(&hdr, &[][..]).unwrap();
    let tree = merge_layers(vec![to_file(&b.into_inner().unwrap())]).unwrap();
    assert_eq!(
        render(&tree),
        format!("{ROOT_LINE} n=2\n/old f 644 5000000:0 @-86400 = n=1")
    );
}

#[test]
fn contents_are_references_into_the_layer_files() {
    let big: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let layers = [
        vec![f("a", "first"), f("big", &big)],
        vec![f("b", "second layer data"), f("a", "replaced")],
    ];
    let bytes: Vec<Vec<u8>> = layers.iter().map(|l| layer_bytes(l)).collect();
    let tree = merge_layers(bytes.iter().map(|b| to_file(b)).collect()).unwrap();
    for (name, want, layer) in [
        ("/a", &b"replaced"[..], 1u32),
        ("/b", b"second layer data", 1),
        ("/big", &big, 0),
    ] {
        let id = tree.resolve(std::path::Path::new(name)).unwrap();
        let NodeKind::File { size, content } = &tree.node(id).kind else {
            panic!("{name} is not a file");
        };
        assert_eq!(*size, want.len() as u64);
        let Content::Layer { layer: l, offset } = content else {
            panic!("{name} content is not in a layer");
        };
        assert_eq!(*l, layer);
        let off = *offset as usize;
        assert_eq!(&bytes[layer as usize][off..off + want.len()], want);
        assert_eq!(read_all(&tree, id), want);
    }
    // Partial reads at an offset.
    let id = tree.resolve(std::path::Path::new("/big")).unwrap();
    let mut buf = [0u8; 10];
    assert_eq!(tree.read_at(id, 99_995, &mut buf).unwrap(), 5);
    assert_eq!(&buf[..5], &big[99_995..]);
}

#[test]
fn builder_injection_api() {
    let files = vec![to_file(&layer_bytes(&[
        d("etc"),
        f("etc/hosts", "h"),
        l("lib", "usr/lib"),
        d("usr/lib"),
        f("usr/lib/x", "x"),
    ]))];
    let mut b = TreeBuilder::new();
    b.apply_layer(0, &files[0]).unwrap();
    let meta = |mode| Meta {
        mode,
        ..Meta::default()
    };
    let bytes = |s: &str| NodeKind::File {
        size: s.len() as u64,
        content: Content::Bytes(s.as_bytes().into()),
    };
    b.insert(b"/etc/fsify-entrypoint", bytes("{}"), meta(0o644))
        .unwrap();
    b.insert(b"/opt/agent/bin/kestrel", bytes("elf"), meta(0o755))
        .unwrap();
    b.insert(b"/lib/injected", bytes("via symlink"), meta(0o600))
        .unwrap();
    b.mkdir_all(b"/etc", meta(0o700)).unwrap();
    b.mkdir_all(b"/srv/data/deep", meta(0o750)).unwrap();
    b.insert(b"/etc/hosts", bytes("replaced"), meta(0o644))
        .unwrap();
    assert!(b.exists(b"/etc/hosts"));
    assert!(b.exists(b"lib/x"));
    assert!(b.exists(b"/lib"));
    assert!(!b.exists(b"/nope"));
    assert!(b.remove(b"/usr/lib/x").unwrap());
    assert!(!b.remove(b"/usr/lib/x").unwrap());
    assert!(!b.exists(b"/lib/x"));
    assert!(matches!(
        b.insert(b"/d", NodeKind::Dir { entries: vec![] }, meta(0o755)),
        Err(MergeError::Inject { .. })
    ));
    assert!(b.insert(b"/", bytes("x"), meta(0)).is_err());
    assert!(b.remove(b"/").is_err());
    let tree = b.freeze(files.into_iter().map(Arc::new).collect());
    let want = [
        &format!("{ROOT_LINE} n=6"),
        "/etc d 700 0:0 @0 n=2",
        "/etc/fsify-entrypoint f 644 0:0 @0 ={} n=1",
        "/etc/hosts f 644 0:0 @0 =replaced n=1",
        "/lib l 777 0:0 @0 ->usr/lib n=1",
        "/opt d 755 0:0 @0 n=3",
        "/opt/agent d 755 0:0 @0 n=3",
        "/opt/agent/bin d 755 0:0 @0 n=2",
        "/opt/agent/bin/kestrel f 755 0:0 @0 =elf n=1",
        "/srv d 755 0:0 @0 n=3",
        "/srv/data d 755 0:0 @0 n=3",
        "/srv/data/deep d 750 0:0 @0 n=2",
        "/usr d 755 0:0 @0 n=3",
        "/usr/lib d 755 0:0 @0 n=2",
        "/usr/lib/injected f 600 0:0 @0 =via\\x20symlink n=1",
    ]
    .map(|s| s.replace("\\x20", " "))
    .join("\n");
    assert_eq!(render(&tree), want);
}

#[test]
fn header_number_and_pax_parsing() {
    assert_eq!(numeric(b"0000644\0"), Some(0o644));
    assert_eq!(numeric(b"   17 \0"), Some(0o17));
    assert_eq!(numeric(b"\0\0\0\0"), Some(0));
    assert_eq!(numeric(b"0008"), None);
    assert_eq!(numeric(&[0x80, 0, 0, 0, 0, 0, 0x01, 0x00]), Some(256));
    assert_eq!(numeric(&[0xff; 12]), Some(-1));
    let cases: &[(&str, Option<(i64, u32)>)] = &[
        ("0", Some((0, 0))),
        ("1.5", Some((1, 500_000_000))),
        ("-123.25", Some((-124, 750_000_000))),
        ("-86400.5", Some((-86401, 500_000_000))),
        ("-7", Some((-7, 0))),
        ("1.1234567899", Some((1, 123_456_789))),
        (".5", Some((0, 500_000_000))),
        ("", None),
        ("-", None),
        ("1e3", None),
        ("99999999999999999999", None),
    ];
    for (input, want) in cases {
        assert_eq!(
            parse_pax_time(input.as_bytes()),
            want.map(|(s, n)| Timestamp::new(s, n)),
            "{input}"
        );
    }
    let recs = parse_pax(b"13 key=a\nb=c\n8 k2=\xff\0\n").unwrap();
    assert_eq!(
        recs,
        vec![
            (b"key".to_vec(), b"a\nb=c".to_vec()),
            (b"k2".to_vec(), b"\xff\0".to_vec())
        ]
    );
    assert!(parse_pax(b"99 key=a\n").is_err());
    assert!(parse_pax(b"x key=a\n").is_err());
    assert!(parse_pax(b"8 keya\n").is_err());
}

/// 100k entries: prints the time; run with `cargo test --release -- --ignored merge_100k`.
#[test]
#[ignore]
fn merge_100k_entries_timing() {
    let mut entries = Vec::with_capacity(101_000);
    for dir in 0..1000 {
        entries.push(d(format!("usr/share/d{dir:04}")));
        for file in 0..100 {
            entries.push(f(format!("usr/share/d{dir:04}/file-{file:03}.txt"), "abc"));
        }
    }
    let layer = to_file(&layer_bytes(&entries));
    let start = std::time::Instant::now();
    let tree = merge_layers(vec![layer]).unwrap();
    let took = start.elapsed();
    let stats = tree.stats();
    eprintln!(
        "merged {} entries ({} inodes) in {:?}",
        stats.entries, stats.inodes, took
    );
    assert_eq!(stats.files, 100_000);
}

// ---- differential check against umoci ---------------------------------------------------------

/// Write an OCI image layout holding `layers` (uncompressed) and return its directory.
fn oci_layout(dir: &std::path::Path, layers: &[Vec<u8>]) {
    let b = LayoutBuilder::at(dir);
    let layers: Vec<Layer> = layers.iter().map(|l| Layer::plain(l.clone())).collect();
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let m = b.image_with_config("linux/amd64", &layers, &config, OCI_MANIFEST);
    b.write_index_json(&[(m, Some("t"))]);
}

/// Render an unpacked rootfs on disk in the same format as [`render`]. Directories with an
/// mtime within the hour after `fresh` were created by the unpacker (umoci stamps them with the current
/// time where the merge uses the epoch) and are rendered with mtime 0.
fn render_dir(root: &std::path::Path, fresh: Option<i64>) -> String {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut lines = Vec::new();
    let mut groups: HashMap<u64, Vec<u8>> = HashMap::new();
    fn walk(
        p: &std::path::Path,
        rel: &[u8],
        lines: &mut Vec<String>,
        groups: &mut HashMap<u64, Vec<u8>>,
        fresh: Option<i64>,
    ) {
        let md = std::fs::symlink_metadata(p).unwrap();
        let ft = md.file_type();
        let (ty, detail) = if ft.is_dir() {
            ('d', String::new())
        } else if ft.is_file() {
            ('f', format!(" ={}", esc(&std::fs::read(p).unwrap())))
        } else if ft.is_symlink() {
            let t = std::fs::read_link(p).unwrap();
            ('l', format!(" ->{}", esc(t.as_os_str().as_bytes())))
        } else if ft.is_char_device() || ft.is_block_device() {
            let (ma, mi) = (libc::major(md.rdev()), libc::minor(md.rdev()));
            (
                if ft.is_char_device() { 'c' } else { 'b' },
                format!(" {ma},{mi}"),
            )
        } else {
            ('p', String::new())
        };
        let is_fresh = fresh.is_some_and(|f| (f..f + 3600).contains(&md.mtime()));
        let (sec, nsec) = if ty == 'd' && is_fresh {
            (0, 0)
        } else {
            (md.mtime(), md.mtime_nsec())
        };
        let mut line = format!(
            "{} {ty} {:o} {}:{} @{sec}",
            esc(rel),
            md.mode() & 0o7777,
            md.uid(),
            md.gid(),
        );
        if nsec != 0 {
            line += &format!(".{nsec:09}");
        }
        line += &detail;
        let mut names: Vec<_> = xattr::list(p).map(|l| l.collect()).unwrap_or_default();
        names.sort_by(|a: &std::ffi::OsString, b| a.as_bytes().cmp(b.as_bytes()));
        for n in names {
            let v = xattr::get(p, &n).ok().flatten().unwrap_or_default();
            line += &format!(" x:{}={}", esc(n.as_bytes()), hex::encode(v));
        }
        line += &format!(" n={}", md.nlink());
        if ty != 'd' && md.nlink() > 1 {
            let first = groups.entry(md.ino()).or_insert_with(|| rel.to_vec());
            line += &format!(" grp={}", esc(first));
        }
        lines.push(line);
        if ft.is_dir() {
            let mut kids: Vec<_> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            kids.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for k in kids {
                let mut r = rel.to_vec();
                if r.len() > 1 {
                    r.push(b'/');
                }
                r.extend_from_slice(k.as_bytes());
                walk(&p.join(&k), &r, lines, groups, fresh);
            }
        }
    }
    walk(root, b"/", &mut lines, &mut groups, fresh);
    lines.join("\n")
}

/// Cases where the merge deliberately differs from umoci 0.4, with the reason.
const UMOCI_DIFFERS: &[(&str, &str)] = &[
    (
        "aufs metadata is skipped",
        "umoci unpacks .wh..wh.* names; docker skips them",
    ),
    (
        "a non-directory parent is replaced by an implicit directory",
        "umoci fails with ENOTDIR",
    ),
    (
        "unsupported entry types are skipped",
        "umoci fails on unknown types",
    ),
    (
        "contiguous files are regular files",
        "umoci fails on type 7",
    ),
    (
        "libarchive xattrs",
        "umoci ignores LIBARCHIVE.xattr records",
    ),
];

/// Unpack every table case with `umoci unpack` (as root) and compare the rootfs with the
/// merge's listing, line by line (directory mtimes umoci sets to "now" count as the epoch).
#[test]
fn umoci_agrees_with_merge_cases() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: umoci comparison needs root");
        return;
    }
    if std::process::Command::new("umoci")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: umoci not installed");
        return;
    }
    let fresh = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - 1;
    let mut failures = Vec::new();
    let mut compared = 0;
    for (name, layers, _) in cases() {
        if UMOCI_DIFFERS.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let tmp = tempfile::tempdir().unwrap();
        let bytes: Vec<Vec<u8>> = layers.iter().map(|l| layer_bytes(l)).collect();
        oci_layout(&tmp.path().join("img"), &bytes);
        let out = std::process::Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:t", tmp.path().join("img").display()))
            .arg(tmp.path().join("bundle"))
            .output()
            .unwrap();
        if !out.status.success() {
            failures.push(format!(
                "case {name:?}: umoci failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            continue;
        }
        let theirs = render_dir(&tmp.path().join("bundle/rootfs"), Some(fresh));
        let ours = merge(&layers)
            .map(|t| render(&t))
            .unwrap_or_else(|e| format!("error: {e}"));
        if ours != theirs {
            failures.push(format!(
                "case {name:?}:\n--- umoci\n{theirs}\n--- ours\n{ours}"
            ));
        }
        compared += 1;
    }
    eprintln!("compared {compared} cases with umoci");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Archives written by GNU tar (gnu format with `L`/`K` records, pax format with xattrs and
/// nanosecond mtimes) merge into exactly the tree they were made from.
#[test]
fn gnu_tar_archives_reproduce_their_source() {
    use std::process::Command;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: building the source tree (devices, owners) needs root");
        return;
    }
    if Command::new("tar").arg("--version").output().is_err() {
        eprintln!("SKIP: GNU tar not installed");
        return;
    }
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let deep = src.join(long('d', 120)).join("sub");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join(long('f', 150)), "deep").unwrap();
    std::fs::write(src.join("a"), "hello").unwrap();
    std::fs::hard_link(src.join("a"), src.join("hard")).unwrap();
    std::fs::hard_link(src.join("a"), deep.join(long('h', 120))).unwrap();
    std::os::unix::fs::symlink(format!("/{}", long('t', 150)), src.join("sym")).unwrap();
    std::fs::write(
        src.join(std::ffi::OsStr::from_bytes(b"new\nline \\ \xff")),
        "odd",
    )
    .unwrap();
    nix::unistd::mkfifo(
        &src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &src.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    std::fs::create_dir(src.join("tmp")).unwrap();
    run(Command::new("chmod").args(["1777"]).arg(src.join("tmp")));
    run(Command::new("chmod").args(["4755"]).arg(src.join("a")));
    run(Command::new("chown")
        .args(["-h", "70000:3000000"])
        .arg(src.join("sym")));
    run(Command::new("find").arg(&src).args([
        "-exec",
        "touch",
        "-h",
        "-d",
        "@1700000000",
        "{}",
        "+",
    ]));

    let check = |format: &str, extra: &[&str]| {
        let archive = tmp.path().join(format!("{format}.tar"));
        run(Command::new("tar")
            .arg(format!("--format={format}"))
            .args(extra)
            .arg("-C")
            .arg(&src)
            .arg("-cf")
            .arg(&archive)
            .arg("."));
        let tree = merge_layers(vec![File::open(&archive).unwrap()]).unwrap();
        assert_eq!(render(&tree), render_dir(&src, None), "format {format}");
    };
    check("gnu", &[]);
    // Xattrs, sub-second and pre-1970 times only survive in pax archives.
    let xattrs = xattr::set(src.join("a"), "user.bin", &[0x00, 0xff, 0x0a, b'=']).is_ok();
    run(Command::new("touch")
        .args(["-h", "-d", "@1700000000.25"])
        .arg(src.join("a")));
    run(Command::new("touch")
        .args(["-h", "-d", "@-86400.5"])
        .arg(src.join("fifo")));
    check("pax", &["--xattrs", "--xattrs-include=*"]);
    if !xattrs {
        eprintln!("note: user xattrs unsupported on this filesystem, not compared");
    }
}
