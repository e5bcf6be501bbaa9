//! A header-only tar reader: yields each entry's metadata and the offset of its data, seeking
//! past the data itself.
//!
//! Own code rather than the `tar` crate's iterator because the merge needs PAX records exactly
//! as written: the crate splits PAX data on newlines, which breaks binary xattr values (and
//! any later `path`/`size` record) containing a 0x0a byte. Handled: ustar (with prefix), GNU
//! and v7 headers, octal and base-256 numbers (negative mtimes included), PAX local records
//! (`path`, `linkpath`, `size`, `uid`, `gid`, `mtime`, everything else kept for the caller;
//! records with an empty value are ignored, as Go's archive/tar does),
//! PAX global headers (skipped), GNU long names and long links.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};

use crate::tree::Timestamp;

const BLOCK: u64 = 512;

/// PAX records as raw `(key, value)` bytes, in archive order.
pub(super) type PaxRecords = Vec<(Vec<u8>, Vec<u8>)>;

/// Largest PAX / long-name payload accepted (guards memory against hostile headers).
const MAX_META_DATA: u64 = 16 * 1024 * 1024;

/// One entry's headers, with every extension applied.
#[derive(Debug, Default)]
pub(super) struct RawEntry {
    /// The type flag byte (`0`, `5`, `S`, ...).
    pub typeflag: u8,
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub mode: u64,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: Timestamp,
    pub devmajor: u64,
    pub devminor: u64,
    /// Offset of the entry's data in the tar file.
    pub data_offset: u64,
    /// PAX records that were not consumed above (xattrs, `GNU.sparse.*`, ...), in order.
    pub pax: PaxRecords,
}

/// Why the archive could not be read. `entry` is the path of the entry concerned when known,
/// else of the last complete entry.
#[derive(Debug)]
pub(super) enum ReadError {
    Io(io::Error),
    /// A malformed header or record.
    Bad {
        entry: Vec<u8>,
        reason: String,
    },
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// Buffered, position-tracking access to a layer file: forward seeks inside the buffer cost
/// nothing, which matters since most files in a layer are small. The buffer is small (8 KiB):
/// after a seek past a large file only the next header is wanted, and refilling a big buffer
/// there reads data that is never looked at (64 KiB made the Debian merge 40% slower).
struct LayerReader<'f> {
    inner: BufReader<&'f File>,
    pos: u64,
}

impl LayerReader<'_> {
    fn seek_to(&mut self, target: u64) -> io::Result<()> {
        if target == self.pos {
            return Ok(());
        }
        match i64::try_from(target as i128 - self.pos as i128) {
            Ok(delta) => self.inner.seek_relative(delta)?,
            Err(_) => {
                self.inner.seek(SeekFrom::Start(target))?;
            }
        }
        self.pos = target;
        Ok(())
    }

    /// Fill `buf` completely; `Ok(false)` if the file ends before its first byte.
    fn read_block(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) if done == 0 => return Ok(false),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tar header cut short",
                    ))
                }
                Ok(n) => {
                    done += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

pub(super) struct TarReader<'f> {
    r: LayerReader<'f>,
    /// Offset of the next header.
    next: u64,
    /// Path of the last entry returned, for error messages.
    last: Vec<u8>,
    done: bool,
}

impl<'f> TarReader<'f> {
    pub fn new(file: &'f File) -> io::Result<Self> {
        let mut inner = BufReader::with_capacity(8 * 1024, file);
        inner.seek(SeekFrom::Start(0))?;
        Ok(TarReader {
            r: LayerReader { inner, pos: 0 },
            next: 0,
            last: Vec::new(),
            done: false,
        })
    }

    fn bad(&self, reason: impl Into<String>) -> ReadError {
        ReadError::Bad {
            entry: self.last.clone(),
            reason: reason.into(),
        }
    }

    /// Read the data of a metadata entry (PAX, long name) of `size` bytes at `offset`.
    fn read_meta_data(&mut self, offset: u64, size: u64) -> Result<Vec<u8>, ReadError> {
        if size > MAX_META_DATA {
            return Err(self.bad(format!(
                "extension header of {size} bytes exceeds {MAX_META_DATA}"
            )));
        }
        self.r.seek_to(offset)?;
        let mut data = vec![0u8; size as usize];
        if !data.is_empty() && !self.r.read_block(&mut data)? {
            return Err(ReadError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "tar extension data cut short",
            )));
        }
        Ok(data)
    }

    /// The next real entry, or `None` at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<RawEntry>, ReadError> {
        if self.done {
            return Ok(None);
        }
        let mut pax: Option<PaxRecords> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            let header_pos = self.next;
            self.r.seek_to(header_pos)?;
            let mut h = [0u8; BLOCK as usize];
            if !self.r.read_block(&mut h)? || h.iter().all(|&b| b == 0) {
                self.done = true;
                if pax.is_some() || long_name.is_some() || long_link.is_some() {
                    return Err(self.bad("extension header without a following entry"));
                }
                return Ok(None);
            }
            check_sum(&h).map_err(|r| self.bad(r))?;
            let typeflag = h[156];
            let mut size = numeric(&h[124..136])
                .and_then(|v| u64::try_from(v).ok())
                .ok_or_else(|| self.bad("invalid size field"))?;
            let data_offset = header_pos + BLOCK;
            match typeflag {
                b'x' | b'g' | b'L' | b'K' => {
                    let data = self.read_meta_data(data_offset, size)?;
                    self.next =
                        next_header(data_offset, size).ok_or_else(|| self.bad("size overflow"))?;
                    match typeflag {
                        b'x' => {
                            let records = parse_pax(&data).map_err(|r| self.bad(r))?;
                            pax.get_or_insert_with(Vec::new).extend(records);
                        }
                        b'L' => long_name = Some(cstr(&data).to_vec()),
                        b'K' => long_link = Some(cstr(&data).to_vec()),
                        _ => {} // global PAX headers are ignored
                    }
                    continue;
                }
                _ => {}
            }

            let magic = &h[257..263];
            let mut path = Vec::new();
            if magic == b"ustar\0" && h[345] != 0 {
                path.extend_from_slice(cstr(&h[345..500]));
                path.push(b'/');
            }
            path.extend_from_slice(cstr(&h[0..100]));
            let mut e = RawEntry {
                typeflag,
                path,
                link: cstr(&h[157..257]).to_vec(),
                ..RawEntry::default()
            };
            if let Some(n) = long_name.take() {
                e.path = n;
            }
            if let Some(l) = long_link.take() {
                e.link = l;
            }
            // Field errors name the entry itself.
            self.last.clone_from(&e.path);
            let field = |range: std::ops::Range<usize>, what: &str| {
                numeric(&h[range])
                    .and_then(|v| u64::try_from(v).ok())
                    .ok_or_else(|| format!("invalid {what} field"))
            };
            let fields = (|| -> Result<(), String> {
                e.mode = field(100..108, "mode")?;
                e.uid = field(108..116, "uid")?;
                e.gid = field(116..124, "gid")?;
                let mtime = numeric(&h[136..148]).ok_or("invalid mtime field")?;
                e.mtime =
                    Timestamp::new(i64::try_from(mtime).map_err(|_| "mtime out of range")?, 0);
                if typeflag == b'3' || typeflag == b'4' {
                    e.devmajor = field(329..337, "device major")?;
                    e.devminor = field(337..345, "device minor")?;
                }
                Ok(())
            })();
            fields.map_err(|r| self.bad(r))?;
            for (key, value) in pax.take().unwrap_or_default() {
                // An empty value keeps the header's own field (POSIX: it deletes the record);
                // Go's archive/tar, and so umoci, ignore such records, xattrs included.
                if value.is_empty() {
                    continue;
                }
                let num = |v: &[u8]| -> Result<u64, String> {
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .ok_or_else(|| {
                            format!(
                                "invalid pax {} record {:?}",
                                String::from_utf8_lossy(&key),
                                String::from_utf8_lossy(v)
                            )
                        })
                };
                match key.as_slice() {
                    b"path" => e.path = value,
                    b"linkpath" => e.link = value,
                    b"size" => size = num(&value).map_err(|r| self.bad(r))?,
                    b"uid" => e.uid = num(&value).map_err(|r| self.bad(r))?,
                    b"gid" => e.gid = num(&value).map_err(|r| self.bad(r))?,
                    b"mtime" => {
                        e.mtime = parse_pax_time(&value).ok_or_else(|| {
                            self.bad(format!(
                                "invalid pax mtime record {:?}",
                                String::from_utf8_lossy(&value)
                            ))
                        })?
                    }
                    _ => e.pax.push((key, value)),
                }
            }
            self.last.clone_from(&e.path);
            e.size = size;
            e.data_offset = data_offset;
            // Entries without data of their own, whatever their size field says (as GNU tar
            // and Go read them).
            let stored = match typeflag {
                b'1' | b'2' | b'3' | b'4' | b'5' | b'6' => 0,
                _ => size,
            };
            self.next =
                next_header(data_offset, stored).ok_or_else(|| self.bad("size overflow"))?;
            return Ok(Some(e));
        }
    }

    /// Path of the last entry read (for messages about what follows it).
    pub fn last_path(&self) -> &[u8] {
        &self.last
    }
}

fn next_header(data_offset: u64, size: u64) -> Option<u64> {
    let padded = size.checked_add(BLOCK - 1)? & !(BLOCK - 1);
    data_offset.checked_add(padded)
}

/// Bytes up to the first NUL.
fn cstr(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

fn check_sum(h: &[u8; BLOCK as usize]) -> Result<(), String> {
    let stored = numeric(&h[148..156]).ok_or("invalid checksum field")?;
    let mut unsigned: i64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += i64::from(b);
        signed += i64::from(b as i8);
    }
    if i128::from(unsigned) == stored || i128::from(signed) == stored {
        Ok(())
    } else {
        Err("tar header checksum mismatch".into())
    }
}

/// A numeric header field: octal (spaces and NULs around it allowed) or GNU base-256
/// (first byte 0x80 for positive, 0xff for negative, two's complement).
pub(super) fn numeric(field: &[u8]) -> Option<i128> {
    let first = *field.first()?;
    if first & 0x80 != 0 {
        // Base-256, big-endian two's complement: 0x80 marks a positive value (its low bits
        // belong to the number), 0xff a negative one.
        let mut v: i128 = if first == 0xff {
            -1
        } else {
            i128::from(first & 0x7f)
        };
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(i128::from(b))?;
        }
        return Some(v);
    }
    let s: &[u8] = {
        let start = field.iter().position(|&b| b != b' ' && b != 0);
        match start {
            None => return Some(0),
            Some(start) => {
                let rest = &field[start..];
                let end = rest
                    .iter()
                    .position(|&b| b == b' ' || b == 0)
                    .unwrap_or(rest.len());
                &rest[..end]
            }
        }
    };
    let mut v: i128 = 0;
    for &b in s {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        v = v * 8 + i128::from(b - b'0');
    }
    Some(v)
}

/// PAX records: `"<len> <key>=<value>\n"` where `<len>` counts the whole record, so values
/// may hold any byte (newlines and NULs included).
pub(super) fn parse_pax(mut data: &[u8]) -> Result<PaxRecords, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        // Some writers pad the data with NULs.
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let space = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or("malformed pax record (no length)")?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("malformed pax record length")?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("malformed pax record".into());
        }
        let record = &data[space + 1..len - 1];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or("malformed pax record (no '=')")?;
        out.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

/// A PAX time: decimal seconds, optionally negative and fractional (`-1.25` is 1.25 s before
/// the epoch: sec -2, nsec 750000000). Digits beyond nanoseconds are truncated.
pub(super) fn parse_pax_time(v: &[u8]) -> Option<Timestamp> {
    let (negative, v) = match v.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, v),
    };
    let (int, frac) = match v.iter().position(|&b| b == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &[][..]),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.iter().chain(frac).all(u8::is_ascii_digit) {
        return None;
    }
    let mut sec: i64 = 0;
    for &d in int {
        sec = sec.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
    }
    let mut nsec: u32 = 0;
    for i in 0..9 {
        nsec = nsec * 10 + frac.get(i).map_or(0, |d| u32::from(d - b'0'));
    }
    if negative {
        if nsec > 0 {
            Some(Timestamp::new(
                sec.checked_neg()?.checked_sub(1)?,
                1_000_000_000 - nsec,
            ))
        } else {
            Some(Timestamp::new(sec.checked_neg()?, 0))
        }
    } else {
        Some(Timestamp::new(sec, nsec))
    }
}

/// Decode `%XX` escapes (LIBARCHIVE.xattr names).
pub(super) fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            let hi = (hex[0] as char).to_digit(16)?;
            let lo = (hex[1] as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Standard base64 with optional padding (LIBARCHIVE.xattr values).
pub(super) fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 2);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &c in s {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}
