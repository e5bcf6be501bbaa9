//! The squashfs writer against its oracles: squashfs-tools' `unsquashfs` (`-s` for the
//! superblock, `-lln` for the full listing, `-d` to extract) and, as root, the kernel
//! (`mount -t squashfs -o loop,ro`). Synthetic trees cover every node kind and the awkward
//! cases (hard links, setuid/setgid/sticky, 256-byte names, a directory of 12,000 entries,
//! ids above 65535, mtimes outside 32 bits, xattrs in the three namespaces, sparse blocks,
//! duplicates, files at block boundaries, every block size class and compressor). Each
//! image is read back entry by entry: type, mode, uid, gid, mtime, size, content sha256,
//! symlink target, device numbers, xattrs and hard-link inode sharing must all match.
//! Without squashfs-tools (or without root, for the mounts and extraction) the checks that
//! need them are skipped with a message.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::{write, Compression, SquashError, SquashOptions, SquashReport};
use crate::testkit::Mount;
use crate::tree::{Content, NodeId, NodeKind, Timestamp, Tree};
use crate::treetest::{
    capability, compare, expected, have, host_tree, is_root, meta, run, sha, text, with_x, x, T,
};

/// The tree with everything: every kind of node and the awkward cases, for block size `bs`.
fn everything(bs: usize) -> Tree {
    let mut t = T::new();
    t.nodes[0].meta = with_x(meta(0o755, 0, 0, 1_650_000_000), vec![x("user.root", b"r")]);
    let m = |mode| meta(mode, 0, 0, 1_600_000_000);
    // Sizes around every boundary: empty, tiny, block - 1, block, block + 1, 3 blocks.
    for (i, size) in [0, 1, 4095, 4096, bs - 1, bs, bs + 1, 3 * bs, 2 * bs + 77]
        .into_iter()
        .enumerate()
    {
        t.file(0, &format!("size-{size}"), &text(size, i as u32), m(0o644));
    }
    // Sparse: blocks of zeros inside, at the end, and a file of zeros only.
    let mut sparse = text(bs, 1);
    sparse.extend(std::iter::repeat_n(0u8, 2 * bs));
    sparse.extend(text(bs / 2, 2));
    t.file(0, "sparse-middle", &sparse, m(0o644));
    let mut zero_end = text(bs, 3);
    zero_end.extend(std::iter::repeat_n(0u8, bs + 100));
    t.file(0, "sparse-end", &zero_end, m(0o644));
    t.file(0, "zeros", &vec![0u8; 3 * bs], m(0o600));
    // Duplicates: a multi-block file and a fragment-only one, each twice.
    let dup = text(2 * bs + 5, 9);
    t.file(0, "dup-a", &dup, m(0o644));
    t.file(0, "dup-b", &dup, m(0o640));
    t.file(0, "small-dup-a", b"same small contents", m(0o644));
    t.file(0, "small-dup-b", b"same small contents", m(0o644));
    // Special bits and ownership, including ids above 65535.
    t.file(
        0,
        "setuid",
        b"#!/bin/sh\n",
        meta(0o4755, 0, 0, 1_600_000_000),
    );
    t.file(
        0,
        "setgid",
        b"#!/bin/sh\n:\n",
        meta(0o2711, 0, 50, 1_600_000_000),
    );
    t.dir(0, "sticky", meta(0o1777, 0, 0, 1_600_000_000));
    t.file(
        0,
        "big-ids",
        b"ids",
        meta(0o644, 4_000_000_000, 65_536, 1_600_000_000),
    );
    t.file(
        0,
        "uid-1000",
        b"1000",
        meta(0o644, 1000, 1000, 1_600_000_000),
    );
    // Times: 0, the last 32-bit second, before 1970 (written as 0), after 2106 (clamped).
    t.file(0, "t-zero", b"t0", meta(0o644, 0, 0, 0));
    t.file(0, "t-max", b"tmax", meta(0o644, 0, 0, u32::MAX as i64));
    t.file(0, "t-neg", b"tneg", meta(0o644, 0, 0, -86_400));
    t.file(0, "t-far", b"tfar", meta(0o644, 0, 0, 10_000_000_000));
    // Xattrs: capability, user., trusted., on files, a directory, a symlink, a device.
    t.file(
        0,
        "cap",
        b"\x7fELF",
        with_x(
            m(0o755),
            vec![
                x("security.capability", &capability()),
                x("user.mime_type", b"application/x-executable"),
                x("trusted.overlay.opaque", b"y"),
            ],
        ),
    );
    t.file(
        0,
        "user-x",
        b"u",
        with_x(
            m(0o644),
            vec![x("user.empty", b""), x("user.k", &[0, 1, 2, 255])],
        ),
    );
    t.file(
        0,
        "user-x-same",
        b"v",
        with_x(
            m(0o644),
            vec![x("user.empty", b""), x("user.k", &[0, 1, 2, 255])],
        ),
    );
    let xd = t.dir(
        0,
        "xattr-dir",
        with_x(m(0o755), vec![x("user.dir", &vec![b'd'; 300])]),
    );
    t.file(xd, "inside", b"inside", m(0o644));
    t.add(
        xd,
        b"link-x",
        NodeKind::Symlink {
            target: b"inside".as_slice().into(),
        },
        with_x(m(0o777), vec![x("trusted.sym", b"s")]),
    );
    // Symlinks: short, long (4095 bytes), absolute, dangling.
    t.add(
        0,
        b"sym-short",
        NodeKind::Symlink {
            target: b"size-1".as_slice().into(),
        },
        m(0o777),
    );
    let long_target: Vec<u8> = (0..4095)
        .map(|i| {
            if i % 100 == 99 {
                b'/'
            } else {
                b'a' + (i % 26) as u8
            }
        })
        .collect();
    t.add(
        0,
        b"sym-long",
        NodeKind::Symlink {
            target: long_target.into(),
        },
        m(0o777),
    );
    t.add(
        0,
        b"sym-abs",
        NodeKind::Symlink {
            target: b"/etc/passwd".as_slice().into(),
        },
        meta(0o777, 1000, 1000, 1_600_000_000),
    );
    // Devices and a fifo.
    let dev = t.dir(0, "dev", m(0o755));
    t.add(
        dev,
        b"null",
        NodeKind::CharDevice { major: 1, minor: 3 },
        m(0o666),
    );
    t.add(
        dev,
        b"sda",
        NodeKind::BlockDevice { major: 8, minor: 0 },
        m(0o660),
    );
    t.add(
        dev,
        b"big",
        NodeKind::CharDevice {
            major: 4095,
            minor: 0xf_ffff,
        },
        with_x(m(0o600), vec![x("trusted.dev", b"1")]),
    );
    t.add(
        dev,
        b"mid",
        NodeKind::BlockDevice {
            major: 259,
            minor: 70_000,
        },
        m(0o600),
    );
    t.add(
        dev,
        b"fifo",
        NodeKind::Fifo,
        meta(0o620, 5, 6, 1_600_000_000),
    );
    // Hard links: one file with three names in two directories, and a linked symlink.
    let hl = t.file(0, "hard-a", &text(bs + 10, 77), m(0o640));
    t.link(0, b"hard-b", hl);
    t.link(dev, b"hard-c", hl);
    let hs = t.add(
        0,
        b"hard-sym-a",
        NodeKind::Symlink {
            target: b"hard-a".as_slice().into(),
        },
        m(0o777),
    );
    t.link(0, b"hard-sym-b", hs);
    // Names of 255 and 256 bytes (the longest squashfs holds; Linux itself stops at 255).
    let long = t.dir(0, "long-names", m(0o755));
    t.file(long, &"n".repeat(255), b"255", m(0o644));
    t.file(long, &format!("{}z", "m".repeat(254)), b"255b", m(0o644));
    // An empty directory, nested ones, a deep chain.
    t.dir(0, "empty", m(0o700));
    let mut d = t.dir(0, "deep", m(0o755));
    for i in 0..20 {
        d = t.dir(d, &format!("d{i}"), m(0o755));
    }
    t.file(d, "bottom", b"bottom", m(0o644));
    // A large directory: 12,000 entries, some with long names, spanning many metadata
    // blocks (so it is indexed), with a subdirectory in the middle.
    let big = t.dir(0, "big", m(0o755));
    for i in 0..12_000u32 {
        let name = if i % 9 == 0 {
            format!("{i:05}-{}", "L".repeat(180))
        } else {
            format!("{i:05}")
        };
        t.file(big, &name, format!("entry {i}\n").as_bytes(), m(0o644));
    }
    let mid = t.dir(big, "06000-sub", m(0o755));
    t.file(mid, "in-sub", b"sub", m(0o644));
    t.tree()
}

/// What squashfs should give back for a tree time: whole seconds, 32-bit unsigned.
fn squash_time(t: Timestamp) -> (i64, u32) {
    (t.sec.clamp(0, u32::MAX as i64), 0)
}

/// `ls -l` style permissions, as `unsquashfs -lln` prints them.
fn perm_string(kind: char, perm: u32) -> String {
    let mut s = String::new();
    s.push(kind);
    let bit = |b: u32, c: char| if perm & b != 0 { c } else { '-' };
    let special = |x: u32, special: u32, lower: char, upper: char, plain: char| match (
        perm & x != 0,
        perm & special != 0,
    ) {
        (true, true) => lower,
        (false, true) => upper,
        (true, false) => plain,
        (false, false) => '-',
    };
    s.push(bit(0o400, 'r'));
    s.push(bit(0o200, 'w'));
    s.push(special(0o100, 0o4000, 's', 'S', 'x'));
    s.push(bit(0o040, 'r'));
    s.push(bit(0o020, 'w'));
    s.push(special(0o010, 0o2000, 's', 'S', 'x'));
    s.push(bit(0o004, 'r'));
    s.push(bit(0o002, 'w'));
    s.push(special(0o001, 0o1000, 't', 'T', 'x'));
    s
}

/// `YYYY-MM-DD HH:MM` in UTC (days to civil date, proleptic Gregorian).
fn utc_minutes(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60
    )
}

/// The listing `unsquashfs -lln` gives, one line per entry split in fields: permissions,
/// uid/gid, size (or `major,minor`), date and time, path, symlink target.
fn listing_lines(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut f: Vec<String> = Vec::new();
            let mut rest = l;
            for _ in 0..2 {
                let (a, b) = rest.trim_start().split_once(' ').unwrap();
                f.push(a.to_string());
                rest = b;
            }
            // Size, or "major, minor" (device numbers as unsquashfs prints them).
            let is_date = |b: &[u8]| {
                b.len() >= 16
                    && b[..16].iter().enumerate().all(|(i, c)| match i {
                        4 | 7 => *c == b'-',
                        10 => *c == b' ',
                        13 => *c == b':',
                        _ => c.is_ascii_digit(),
                    })
            };
            let tail = rest;
            let b = tail.as_bytes();
            let date_at = (0..b.len())
                .find(|&i| (i == 0 || b[i - 1] == b' ') && is_date(&b[i..]))
                .unwrap();
            let size: String = tail[..date_at].split_whitespace().collect();
            f.push(size);
            f.push(tail[date_at..date_at + 16].to_string());
            let path = &tail[date_at + 17..];
            match path.split_once(" -> ") {
                Some((p, t)) if f[0].starts_with('l') => {
                    f.push(p.to_string());
                    f.push(t.to_string());
                }
                _ => f.push(path.to_string()),
            }
            f
        })
        .collect()
}

fn expected_listing(tree: &Tree) -> Vec<Vec<String>> {
    let (want, _) = expected(tree, squash_time);
    let mut rows: Vec<(Vec<u8>, Vec<String>)> = want
        .iter()
        .map(|(path, r)| {
            let size = match r.rdev {
                // unsquashfs 4.5 prints numbers above 255 wrongly (mksquashfs' images too).
                Some((ma, mi)) if ma > 255 || mi > 255 => "*".into(),
                Some((ma, mi)) => format!("{ma},{mi}"),
                None if r.kind == 'd' => "*".into(),
                None => r.size.to_string(),
            };
            let mut p = b"squashfs-root".to_vec();
            if !path.is_empty() {
                p.push(b'/');
                p.extend_from_slice(path);
            }
            let mut f = vec![
                perm_string(r.kind, r.perm),
                format!("{}/{}", r.uid, r.gid),
                size,
                utc_minutes(r.mtime.0),
                String::from_utf8_lossy(&p).into_owned(),
            ];
            if let Some(t) = &r.target {
                f.push(String::from_utf8_lossy(t).into_owned());
            }
            (p, f)
        })
        .collect();
    // unsquashfs lists depth first, each directory's entries in name order.
    rows.sort_by(|a, b| {
        let ka: Vec<&[u8]> = a.0.split(|c| *c == b'/').collect();
        let kb: Vec<&[u8]> = b.0.split(|c| *c == b'/').collect();
        ka.cmp(&kb)
    });
    rows.into_iter().map(|(_, f)| f).collect()
}

/// Every oracle on one image: the superblock summary, the full listing, an extraction
/// and a kernel mount (as root).
fn check_image(tree: &Tree, image: &Path, opts: &SquashOptions, report: &SquashReport) {
    let bytes = std::fs::read(image).unwrap();
    assert_eq!(bytes.len() as u64, report.bytes);
    assert_eq!(bytes.len() % 4096, 0);
    assert_eq!(Some(sha(&bytes)), report.sha256, "the reported sha256");
    if !have("unsquashfs") {
        crate::testkit::skip_line(
            "unsquashfs checks: squashfs-tools not installed (apt-get install squashfs-tools)",
        );
        return;
    }
    let s = run(Command::new("unsquashfs").arg("-s").arg(image));
    let (want, _) = expected(tree, squash_time);
    let inodes: std::collections::HashSet<NodeId> = {
        let mut set = std::collections::HashSet::new();
        tree.walk(|_, id| {
            set.insert(id);
        });
        set
    };
    for line in [
        format!("Compression {}", opts.compression.name()),
        format!("Block size {}", opts.block_size),
        format!("Number of inodes {}", inodes.len()),
        format!("Number of fragments {}", report.fragments),
        format!("Number of ids {}", report.ids),
        format!("Filesystem size {} bytes", report.bytes_used),
    ] {
        assert!(
            s.lines().any(|l| l.starts_with(&line)),
            "unsquashfs -s lacks {line:?}:\n{s}"
        );
    }
    let any_xattrs = want.values().any(|r| !r.xattrs.is_empty());
    assert_eq!(
        s.contains("Number of xattr ids 0") || s.contains("Xattrs are not stored"),
        !any_xattrs,
        "{s}"
    );
    let list = run(Command::new("unsquashfs")
        .env("TZ", "UTC")
        .arg("-lln")
        .arg(image));
    let mut got = listing_lines(&list);
    let exp = expected_listing(tree);
    // "*": a field not compared (directory sizes, large device numbers).
    for (g, e) in got.iter_mut().zip(&exp) {
        if e.len() > 2 && e[2] == "*" && g.len() > 2 {
            g[2] = "*".into();
        }
    }
    if got != exp {
        let first = got
            .iter()
            .zip(&exp)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(exp.len()));
        panic!(
            "unsquashfs -lln differs at line {first} ({} lines, {} expected):\n got  {:?}\n want {:?}",
            got.len(),
            exp.len(),
            got.get(first),
            exp.get(first)
        );
    }
    if !is_root() {
        crate::testkit::skip_line("extraction and mount checks: not root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("x");
    run(Command::new("unsquashfs")
        .args(["-no-progress", "-quiet", "-d"])
        .arg(&dest)
        .arg(image));
    compare(tree, &dest, "unsquashfs -d", squash_time);
    let m = Mount::image(image, "squashfs", "loop,ro");
    compare(tree, m.path(), "kernel mount", squash_time);
    // Lookups of names that are not there, in the indexed directory, around its entries.
    for name in ["00000", "0000", "05999x", "06000-sua", "11999~", "zzz", "!"] {
        let p = m.path().join("big").join(name);
        let exists = want.contains_key(format!("big/{name}").as_bytes());
        assert_eq!(p.symlink_metadata().is_ok(), exists, "lookup of big/{name}");
    }
}

fn opts(compression: Compression, block_size: u32) -> SquashOptions {
    SquashOptions {
        compression,
        block_size,
        mkfs_time: 1_700_000_000,
        ..SquashOptions::default()
    }
}

fn build(tree: &Tree, o: &SquashOptions, dir: &Path, name: &str) -> (PathBuf, SquashReport) {
    let image = dir.join(name);
    let r = write(tree, o, &image).unwrap();
    (image, r)
}

/// Files whose contents another earlier file already has.
fn duplicate_count(tree: &Tree) -> u64 {
    let (want, nodes) = expected(tree, squash_time);
    let mut seen_nodes = std::collections::HashSet::new();
    let mut contents = std::collections::HashSet::new();
    let mut dups = 0;
    for (path, r) in &want {
        if r.kind == '-'
            && r.size > 0
            && seen_nodes.insert(nodes[path])
            && !contents.insert(r.sha.clone())
        {
            dups += 1;
        }
    }
    dups
}

#[test]
fn every_node_kind_with_every_compressor_reads_back_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let bs = 128 * 1024;
    let tree = everything(bs);
    let dups = duplicate_count(&tree);
    for (comp, level, dict) in [
        (Compression::Xz, None, None),
        (Compression::Xz, Some(2), Some(bs as u32 / 2)),
        (Compression::Zstd, None, None),
        (Compression::Zstd, Some(3), None),
        (Compression::Gzip, None, None),
        (Compression::Gzip, Some(1), None),
        (Compression::Lz4, None, None),
    ] {
        let mut o = opts(comp, bs as u32);
        o.compression_level = level;
        o.xz_dict_size = dict;
        o.threads = 3;
        let t = Instant::now();
        let (image, r) = build(&tree, &o, tmp.path(), &format!("{}.sqfs", comp.name()));
        eprintln!(
            "{} level {level:?}: {} bytes in {:.2} s ({} blocks, {} sparse, {} fragments, {} duplicates)",
            comp.name(),
            r.bytes,
            t.elapsed().as_secs_f64(),
            r.data_blocks,
            r.sparse_blocks,
            r.fragments,
            r.duplicates
        );
        assert_eq!(r.duplicates, dups);
        // sparse-middle 2, sparse-end 2 (its short last block too), zeros 3.
        assert_eq!(
            r.sparse_blocks,
            2 + 2 + 3,
            "zero blocks of the three sparse files"
        );
        check_image(&tree, &image, &o, &r);
        // The same bytes again, and with another thread count.
        o.threads = 1;
        let (again, r2) = build(&tree, &o, tmp.path(), "again.sqfs");
        assert_eq!(r2.sha256, r.sha256, "{}: one thread vs three", comp.name());
        assert_eq!(
            std::fs::read(&again).unwrap(),
            std::fs::read(&image).unwrap()
        );
        std::fs::remove_file(&image).unwrap();
    }
}

#[test]
fn block_sizes_and_packing_choices() {
    let tmp = tempfile::tempdir().unwrap();
    for (bs, always, dedup) in [
        (4096u32, false, true),
        (4096, true, false),
        (65536, true, true),
        (1 << 20, false, false),
    ] {
        let mut t = T::new();
        let m = meta(0o644, 0, 0, 1_600_000_000);
        let b = bs as usize;
        for (i, size) in [1, b - 1, b, b + 1, 2 * b - 1, 5 * b + 3]
            .into_iter()
            .enumerate()
        {
            t.file(0, &format!("f{i}"), &text(size, i as u32), m.clone());
            t.file(0, &format!("g{i}"), &text(size, i as u32), m.clone());
        }
        let sub = t.dir(0, "sub", meta(0o755, 0, 0, 1_600_000_000));
        for i in 0..300 {
            t.file(
                sub,
                &format!("small{i:03}"),
                &text(i * 37 + 1, 1000 + i as u32),
                m.clone(),
            );
        }
        let tree = t.tree();
        let mut o = opts(Compression::Zstd, bs);
        o.always_fragments = always;
        o.dedup = dedup;
        let (image, r) = build(&tree, &o, tmp.path(), &format!("bs{bs}.sqfs"));
        assert_eq!(r.duplicates, if dedup { 6 } else { 0 }, "block size {bs}");
        check_image(&tree, &image, &o, &r);
        if have("unsquashfs") {
            let s = run(Command::new("unsquashfs").arg("-s").arg(&image));
            assert_eq!(
                s.contains("Always-use-fragments option is specified"),
                always,
                "{s}"
            );
        }
    }
}

#[test]
fn a_file_over_4_gib_gets_an_extended_inode() {
    if !is_root() || !have("unsquashfs") {
        crate::testkit::skip_line(
            "a_file_over_4_gib_gets_an_extended_inode: needs root and squashfs-tools",
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // A sparse host file of 4 GiB + 3 blocks: data at the start, past 4 GiB and at the end.
    let host = tmp.path().join("huge");
    let size = (4u64 << 30) + 3 * 131_072 + 17;
    {
        let f = std::fs::File::create(&host).unwrap();
        f.set_len(size).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"past 4 GiB", (4u64 << 30) + 5).unwrap();
        f.write_all_at(b"end", size - 3).unwrap();
    }
    let mut t = T::new();
    t.add(
        0,
        b"huge",
        NodeKind::File {
            size,
            content: Content::HostFile(host.clone()),
        },
        meta(0o644, 0, 0, 1_600_000_000),
    );
    let tree = t.tree();
    let o = opts(Compression::Lz4, 131_072);
    let (image, r) = build(&tree, &o, tmp.path(), "huge.sqfs");
    std::fs::remove_file(&host).unwrap();
    assert!(
        r.bytes < 1 << 20,
        "a sparse file takes no room: {} bytes",
        r.bytes
    );
    assert_eq!(r.data_blocks, size.div_ceil(131_072));
    assert_eq!(r.sparse_blocks, r.data_blocks - 3);
    let list = run(Command::new("unsquashfs").arg("-lln").arg(&image));
    assert!(list.contains(&format!(" {size} ")), "{list}");
    let m = Mount::image(&image, "squashfs", "loop,ro");
    let f = std::fs::File::open(m.path().join("huge")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    use std::os::unix::fs::FileExt;
    for (at, want) in [
        (0u64, b"start".to_vec()),
        ((4u64 << 30) + 5, b"past 4 GiB".to_vec()),
        (size - 3, b"end".to_vec()),
        (1 << 31, vec![0u8; 10]),
    ] {
        let mut buf = vec![0xffu8; want.len()];
        f.read_exact_at(&mut buf, at).unwrap();
        assert_eq!(buf, want, "at {at}");
    }
}

#[test]
fn unrepresentable_trees_and_bad_settings_are_errors_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("bad.sqfs");
    let m = meta(0o644, 0, 0, 0);
    type Make = Box<dyn Fn(&mut T)>;
    let cases: Vec<(Make, &str)> = vec![
        (
            Box::new(|t: &mut T| {
                let d = t.dir(0, "etc", meta(0o755, 0, 0, 0));
                t.file(
                    d,
                    "acl",
                    b"",
                    with_x(
                        meta(0o644, 0, 0, 0),
                        vec![x("system.posix_acl_access", b"\x02\0\0\0")],
                    ),
                );
            }),
            "/etc/acl",
        ),
        (
            Box::new(|t: &mut T| {
                t.add(
                    0,
                    b"dev",
                    NodeKind::CharDevice {
                        major: 5000,
                        minor: 1,
                    },
                    meta(0o600, 0, 0, 0),
                );
            }),
            "/dev",
        ),
        (
            Box::new(|t: &mut T| {
                let d = t.dir(0, "d", meta(0o755, 0, 0, 0));
                t.file(d, &"n".repeat(257), b"", meta(0o644, 0, 0, 0));
            }),
            "/d/nnnn",
        ),
        (
            Box::new(|t: &mut T| {
                t.add(
                    0,
                    b"empty-link",
                    NodeKind::Symlink {
                        target: Box::new([]),
                    },
                    meta(0o777, 0, 0, 0),
                );
            }),
            "/empty-link",
        ),
    ];
    for (make, path) in cases {
        let mut t = T::new();
        t.file(0, "ok", b"fine", m.clone());
        make(&mut t);
        let err = write(&t.tree(), &SquashOptions::default(), &image).unwrap_err();
        assert!(err.to_string().contains(path), "{err} should name {path}");
    }
    // A file that cannot be read: the error names it.
    let mut t = T::new();
    t.add(
        0,
        b"gone",
        NodeKind::File {
            size: 10,
            content: Content::HostFile(tmp.path().join("no-such-file")),
        },
        m.clone(),
    );
    let err = write(&t.tree(), &SquashOptions::default(), &image).unwrap_err();
    assert!(
        matches!(&err, SquashError::Read { path, .. } if path == "/gone"),
        "{err}"
    );
    let tree = T::new().tree();
    for (o, what) in [
        (
            SquashOptions {
                block_size: 3000,
                ..SquashOptions::default()
            },
            "block size",
        ),
        (
            SquashOptions {
                block_size: 2 << 20,
                ..SquashOptions::default()
            },
            "block size",
        ),
        (
            SquashOptions {
                compression_level: Some(10),
                ..SquashOptions::default()
            },
            "level",
        ),
        (
            SquashOptions {
                compression: Compression::Lz4,
                compression_level: Some(1),
                ..SquashOptions::default()
            },
            "levels",
        ),
        (
            SquashOptions {
                xz_dict_size: Some(100_000),
                ..SquashOptions::default()
            },
            "dictionary",
        ),
        (
            SquashOptions {
                xz_dict_size: Some(1 << 20),
                ..SquashOptions::default()
            },
            "dictionary",
        ),
        (
            SquashOptions {
                compression: Compression::Zstd,
                xz_dict_size: Some(1 << 16),
                ..SquashOptions::default()
            },
            "dictionary",
        ),
    ] {
        let err = write(&tree, &o, &image).unwrap_err();
        assert!(
            matches!(err, SquashError::Option(_)) && err.to_string().contains(what),
            "{err}"
        );
    }
}

/// Size and time against mksquashfs on the same files (our image extracted), with the same
/// compressor and block size. A directory of real files from this machine: shared
/// libraries, Python, documentation.
#[test]
fn size_and_time_against_mksquashfs() {
    if !is_root() || !have("mksquashfs") {
        crate::testkit::skip_line(
            "size_and_time_against_mksquashfs: needs root and squashfs-tools",
        );
        return;
    }
    // FLEDGE_LOG=fledge::timing=debug shows the writer's phases.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("FLEDGE_LOG"))
        .with_test_writer()
        .try_init();
    // FLEDGE_SQUASH_BENCH_DIR picks another directory to measure.
    let bench = std::env::var_os("FLEDGE_SQUASH_BENCH_DIR").map(PathBuf::from);
    let defaults = ["/usr/lib/python3.11", "/usr/share/perl5", "/usr/share/doc"];
    let Some(src) = bench
        .into_iter()
        .chain(defaults.into_iter().map(PathBuf::from))
        .find(|p| p.is_dir())
    else {
        crate::testkit::skip_line("size_and_time_against_mksquashfs: no sample directory");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = src.as_path();
    let tree = host_tree(src);
    let stats = tree.stats();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for comp in [Compression::Xz, Compression::Zstd] {
        let mut o = opts(comp, 131_072);
        if comp == Compression::Xz {
            o.xz_dict_percent(50);
        }
        let t = Instant::now();
        let (ours, r) = build(&tree, &o, tmp.path(), "ours.sqfs");
        let ours_s = t.elapsed().as_secs_f64();
        let dest = tmp.path().join("x");
        run(Command::new("unsquashfs")
            .args(["-no-progress", "-quiet", "-d"])
            .arg(&dest)
            .arg(&ours));
        let theirs = tmp.path().join("theirs.sqfs");
        let mut cmd = Command::new("mksquashfs");
        cmd.arg(&dest)
            .arg(&theirs)
            .args([
                "-comp",
                comp.name(),
                "-b",
                "131072",
                "-noappend",
                "-no-progress",
            ])
            .args(["-processors", &cores.to_string(), "-quiet"]);
        if comp == Compression::Xz {
            cmd.args(["-Xdict-size", "50%"]);
        }
        let t = Instant::now();
        run(&mut cmd);
        let theirs_s = t.elapsed().as_secs_f64();
        let theirs_len = std::fs::metadata(&theirs).unwrap().len();
        let ratio = r.bytes as f64 / theirs_len as f64;
        eprintln!(
            "{} on {} ({} files, {} MiB): fledge {} bytes in {ours_s:.2} s, mksquashfs {theirs_len} bytes in {theirs_s:.2} s: size ratio {ratio:.4}, time ratio {:.2}",
            comp.name(),
            src.display(),
            stats.files,
            stats.file_bytes >> 20,
            r.bytes,
            ours_s / theirs_s
        );
        assert!(
            ratio <= 1.02,
            "{}: {ratio:.4} times mksquashfs' size",
            comp.name()
        );
        std::fs::remove_dir_all(&dest).unwrap();
        std::fs::remove_file(&ours).unwrap();
    }
}

/// The uncompressed bytes of a metadata stream, and the block index of each on-disk block
/// offset.
fn unmeta(disk: &[u8]) -> (Vec<u8>, HashMap<u64, usize>) {
    let mut out = Vec::new();
    let mut blocks = HashMap::new();
    let mut at = 0;
    while at < disk.len() {
        let h = u16::from_le_bytes([disk[at], disk[at + 1]]);
        let n = usize::from(h & 0x7fff);
        let data = &disk[at + 2..at + 2 + n];
        let block = if h & 0x8000 != 0 {
            data.to_vec()
        } else {
            zstd::bulk::decompress(data, super::tables::META).unwrap()
        };
        blocks.insert(at as u64, blocks.len());
        assert!(block.len() == super::tables::META || at + 2 + n == disk.len());
        out.extend_from_slice(&block);
        at += 2 + n;
    }
    (out, blocks)
}

/// A large listing decoded back: runs of at most 256 entries sharing an inode block and a
/// base inode number within ±32767, every entry as given, and an index entry for every
/// metadata block the listing reaches after its first, pointing (by the kernel's own
/// arithmetic) at a header whose first name it holds.
#[test]
fn large_listings_split_into_runs_and_are_indexed_per_block() {
    use super::tables::{listing, Entry, MetaWriter, META};
    let codec = SquashOptions {
        compression: Compression::Zstd,
        ..SquashOptions::default()
    }
    .codec()
    .unwrap();
    let mut c = codec.start();
    let mut w = MetaWriter::default();
    // Something before, so the listing starts inside a block.
    w.push(&mut c, &text(5000, 5)).unwrap();
    let names: Vec<Vec<u8>> = (0..12_000u32)
        .map(|i| {
            if i % 9 == 0 {
                format!("{i:05}-{}", "L".repeat(200)).into_bytes()
            } else {
                format!("{i:05}").into_bytes()
            }
        })
        .collect();
    // Inodes in blocks of 300 entries; entry 7000 is far away (a hard link).
    let entries: Vec<Entry> = names
        .iter()
        .enumerate()
        .map(|(i, n)| Entry {
            name: n,
            block: (i / 300) as u32 * 3000,
            offset: (i % 300) as u16 * 24,
            ino: if i == 7000 { 100_000 } else { 10 + i as u32 },
            kind: super::tables::T_FILE,
        })
        .collect();
    let l = listing(&mut w, &mut c, &entries).unwrap();
    let (disk, _) = w.finish(&mut c).unwrap();
    let (raw, blocks) = unmeta(&disk);
    let begin = blocks[&u64::from(l.start)] * META + usize::from(l.offset);
    let end = begin + l.size as usize;
    let u32_at = |p: usize| u32::from_le_bytes(raw[p..p + 4].try_into().unwrap());
    let u16_at = |p: usize| u16::from_le_bytes(raw[p..p + 2].try_into().unwrap());
    let mut p = begin;
    let mut i = 0;
    let mut headers = Vec::new();
    while p < end {
        let count = u32_at(p) as usize + 1;
        let (block, base) = (u32_at(p + 4), u32_at(p + 8) as i32);
        assert!(count <= 256);
        headers.push((p, i));
        p += 12;
        for _ in 0..count {
            let e = &entries[i];
            let diff = u16_at(p + 2) as i16;
            let len = usize::from(u16_at(p + 6)) + 1;
            assert_eq!(
                (block, u16_at(p), base + i32::from(diff), u16_at(p + 4)),
                (e.block, e.offset, e.ino as i32, e.kind),
                "entry {i}"
            );
            assert_eq!(&raw[p + 8..p + 8 + len], e.name, "entry {i}");
            p += 8 + len;
            i += 1;
        }
    }
    assert_eq!((p, i), (end, entries.len()));
    // Runs break at block changes (40 of them), the far inode (2 more) and 256 entries.
    assert!(
        headers.len() >= 40 + 2 + 12_000 / 256,
        "{} headers",
        headers.len()
    );
    let spanned = (end - 1) / META - begin / META;
    assert_eq!(l.index.len(), spanned, "one index entry per further block");
    for ix in &l.index {
        let at = blocks[&u64::from(ix.start)] * META
            + (usize::from(l.offset) + ix.index as usize) % META;
        let (_, first) = headers
            .iter()
            .find(|(hp, _)| *hp == at)
            .unwrap_or_else(|| panic!("index {ix:?} points at no header"));
        assert_eq!(ix.name, entries[*first].name);
        assert_eq!(at - begin, ix.index as usize);
    }
}

/// A tree for the block cache: 2000 small files of 1000 bytes (four tails to a 4 KiB
/// fragment block, so that a longer one shifts the packing of all that follow, but for the
/// anchors), a few multi-block ones, and a mapped host file; the small file `small{changed}`
/// twice as long when `changed` is given.
fn cached_tree(host: &Path, changed: Option<usize>) -> Tree {
    let mut t = T::new();
    let m = meta(0o644, 0, 0, 1_600_000_000);
    for i in 0..3u32 {
        t.file(0, &format!("big{i}"), &text(5 * 4096 + 99, i), m.clone());
    }
    let host_size = std::fs::metadata(host).unwrap().len();
    t.add(
        0,
        b"mapped",
        NodeKind::File {
            size: host_size,
            content: Content::HostFile(host.to_path_buf()),
        },
        m.clone(),
    );
    let sub = t.dir(0, "sub", meta(0o755, 0, 0, 1_600_000_000));
    for i in 0..2000usize {
        let len = if changed == Some(i) { 2000 } else { 1000 };
        t.file(
            sub,
            &format!("small{i:04}"),
            &text(len, 50 + i as u32),
            m.clone(),
        );
    }
    t.tree()
}

/// The block cache: a warm build writes the bytes of a cold one; a changed file, a changed
/// mapped file or changed settings are compressed afresh; damaged entries are compressed
/// again; a changed small file disturbs only the fragment blocks up to the next anchor.
#[test]
fn block_cache_reuses_blocks_and_gives_the_bytes_of_a_cold_build() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let host = tmp.path().join("host-file");
    std::fs::write(&host, text(3 * 4096 + 5, 7)).unwrap();
    let read = |p: &Path| std::fs::read(p).unwrap();
    for compression in [Compression::Xz, Compression::Zstd] {
        let cold_opts = opts(compression, 4096);
        let mut warm_opts = cold_opts.clone();
        warm_opts.block_cache = Some(cache.clone());
        let tree = cached_tree(&host, None);
        let (cold, rc) = build(&tree, &cold_opts, tmp.path(), "cold.sqfs");
        let cold = read(&cold);
        assert_eq!(rc.reused_blocks, 0);
        let stored = rc.compressed_blocks;
        assert!(stored > 500, "{rc:?}");

        // An empty cache: everything compressed, and kept.
        let (first, r1) = build(&tree, &warm_opts, tmp.path(), "first.sqfs");
        assert_eq!(
            read(&first),
            cold,
            "{compression:?}: first build with a cache"
        );
        assert_eq!((r1.reused_blocks, r1.compressed_blocks), (0, stored));
        // Warm: nothing compressed, the same bytes.
        let (warm, r2) = build(&tree, &warm_opts, tmp.path(), "warm.sqfs");
        assert_eq!(read(&warm), cold, "{compression:?}: warm build");
        check_image(&tree, &warm, &warm_opts, &r2);
        assert_eq!((r2.reused_blocks, r2.compressed_blocks), (stored, 0));

        // One small file longer: only the fragment blocks up to the next anchor and
        // the blocks of that file change.
        let changed = cached_tree(&host, Some(40));
        let (c_cold, _) = build(&changed, &cold_opts, tmp.path(), "c-cold.sqfs");
        let (c_warm, r3) = build(&changed, &warm_opts, tmp.path(), "c-warm.sqfs");
        assert_eq!(
            read(&c_warm),
            read(&c_cold),
            "{compression:?}: changed file"
        );
        assert!(
            r3.compressed_blocks > 0 && r3.compressed_blocks * 8 < stored,
            "{compression:?}: {r3:?}"
        );
        eprintln!(
            "{compression:?}: {stored} blocks, {} after the change",
            r3.compressed_blocks
        );

        // The mapped host file rewritten (same size): its blocks miss, nothing stale.
        std::fs::write(&host, text(3 * 4096 + 5, 8)).unwrap();
        let (h_cold, _) = build(&tree, &cold_opts, tmp.path(), "h-cold.sqfs");
        let (h_warm, r4) = build(&tree, &warm_opts, tmp.path(), "h-warm.sqfs");
        assert_eq!(read(&h_warm), read(&h_cold), "{compression:?}: mapped file");
        assert_eq!(r4.compressed_blocks, 4, "{compression:?}: {r4:?}");
        std::fs::write(&host, text(3 * 4096 + 5, 7)).unwrap();

        // Other settings: nothing reused.
        let mut other = warm_opts.clone();
        other.compression_level = Some(if compression == Compression::Xz { 2 } else { 3 });
        let (_, r5) = build(&tree, &other, tmp.path(), "other.sqfs");
        assert_eq!(r5.reused_blocks, 0, "{compression:?}: {r5:?}");

        // Every entry damaged (cut short, or a byte flipped): compressed again, same bytes.
        let mut entries = Vec::new();
        for sub in std::fs::read_dir(super::cache::dir(&cache)).unwrap() {
            for e in std::fs::read_dir(sub.unwrap().path()).unwrap() {
                entries.push(e.unwrap().path());
            }
        }
        for (i, e) in entries.iter().enumerate() {
            let mut b = read(e);
            if i % 2 == 0 {
                b.truncate(b.len() - 1);
            } else {
                let last = b.len() - 1;
                b[last] ^= 0x55;
            }
            std::fs::write(e, b).unwrap();
        }
        let (again, r6) = build(&tree, &warm_opts, tmp.path(), "again.sqfs");
        assert_eq!(read(&again), cold, "{compression:?}: damaged cache");
        assert_eq!((r6.reused_blocks, r6.compressed_blocks), (0, stored));
        std::fs::remove_dir_all(&cache).unwrap();
    }
}

/// Progress: called while the data is written, never backwards, ending at the bytes of the
/// files stored (duplicates add nothing), and the image is the one `write` makes.
#[test]
fn progress_counts_the_stored_file_bytes_in_order() {
    let tree = everything(4096);
    let dir = tempfile::tempdir().unwrap();
    let o = opts(Compression::Zstd, 4096);
    let seen = std::cell::RefCell::new(Vec::new());
    let image = dir.path().join("p.squashfs");
    let r = super::write_with_progress(&tree, &o, &image, &|n| seen.borrow_mut().push(n)).unwrap();
    let seen = seen.into_inner();
    assert!(seen.len() > 1, "progress called {} times", seen.len());
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "progress went back");
    // The unique contents: each stored file's bytes once.
    let (want, nodes) = expected(&tree, squash_time);
    let mut seen_nodes = std::collections::HashSet::new();
    let mut contents = std::collections::HashSet::new();
    let mut unique = 0u64;
    for (path, e) in &want {
        if e.kind == '-' && seen_nodes.insert(nodes[path]) && contents.insert(e.sha.clone()) {
            unique += e.size;
        }
    }
    // Between the unique contents and all file bytes (the writer stores some identical
    // contents twice: it compares only candidates it chose, see data::plan).
    let all: u64 = tree.stats().file_bytes;
    let last = *seen.last().unwrap();
    assert!(
        (unique..all).contains(&last) || last == unique,
        "progress ended at {last}, unique {unique}, all {all}"
    );
    let (plain, r2) = build(&tree, &o, dir.path(), "q.squashfs");
    assert_eq!(r.sha256, r2.sha256);
    assert_eq!(
        std::fs::read(&image).unwrap(),
        std::fs::read(plain).unwrap()
    );
}
