//! The zip container of torch `.pt` files: a reader of the central directory and a writer that lays
//! records out exactly as torch's miniz-based `PyTorchStreamWriter` does (stored records, 64-byte
//! alignment through the `FB` extra field, data descriptors, zip64 end records).

use std::io::Write;

use crate::error::{FormatError, Result};

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const DESCRIPTOR_SIG: u32 = 0x0807_4b50;
const SATURATED: u64 = 0xFFFF_FFFF;
/// torch's default `storage_alignment`.
pub const ALIGNMENT: u64 = 64;

/// One record of an archive, as the central directory describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipRecord {
    /// Full name inside the archive (`archive/data/0`).
    pub name: String,
    /// Compression method (0 = stored; anything else is refused when the data is used).
    pub method: u16,
    /// CRC-32 from the central directory (not checked: torch does not either).
    pub crc32: u32,
    /// Uncompressed size.
    pub size: u64,
    /// Compressed size (the bytes present in the file).
    pub compressed_size: u64,
    /// Absolute offset of the record's data in the file.
    pub data_offset: u64,
}

fn corrupt(msg: impl Into<String>) -> FormatError {
    FormatError::Corrupt(msg.into())
}

fn u16_at(b: &[u8], at: usize) -> Result<u16> {
    at.checked_add(2)
        .and_then(|end| b.get(at..end))
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| corrupt("zip structure runs past the end of the file (truncated?)"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    at.checked_add(4)
        .and_then(|end| b.get(at..end))
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| corrupt("zip structure runs past the end of the file (truncated?)"))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64> {
    at.checked_add(8)
        .and_then(|end| b.get(at..end))
        .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| corrupt("zip structure runs past the end of the file (truncated?)"))
}

fn to_usize(v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| corrupt("zip offset does not fit in memory addresses"))
}

/// Reads the central directory of a whole archive held in memory (usually a memory map).
///
/// Follows the zip64 locator when present, fills saturated fields from zip64 extras, and computes each
/// record's data offset from its *local* header (whose extra field carries torch's alignment padding).
pub fn read_central_directory(bytes: &[u8]) -> Result<Vec<ZipRecord>> {
    if bytes.len() < 22 {
        return Err(corrupt(format!(
            "only {} bytes: too short to be a zip archive (truncated?)",
            bytes.len()
        )));
    }
    // The EOCD is at the end, possibly followed by a comment of up to 65535 bytes.
    let search_from = bytes.len().saturating_sub(22 + 0xFFFF);
    let eocd = (search_from..=bytes.len() - 22)
        .rev()
        .find(|&i| u32_at(bytes, i).ok() == Some(EOCD_SIG))
        .ok_or_else(|| {
            corrupt(
                "no end-of-central-directory record: the file is truncated or not a zip archive",
            )
        })?;
    let mut count = u16_at(bytes, eocd + 10)? as u64;
    let mut cd_size = u32_at(bytes, eocd + 12)? as u64;
    let mut cd_offset = u32_at(bytes, eocd + 16)? as u64;
    if eocd >= 20 && u32_at(bytes, eocd - 20)? == ZIP64_LOCATOR_SIG {
        let z64 = to_usize(u64_at(bytes, eocd - 20 + 8)?)?;
        if u32_at(bytes, z64)? != ZIP64_EOCD_SIG {
            return Err(corrupt(
                "zip64 locator points at something that is not a zip64 end record",
            ));
        }
        count = u64_at(bytes, z64.saturating_add(32))?;
        cd_size = u64_at(bytes, z64.saturating_add(40))?;
        cd_offset = u64_at(bytes, z64.saturating_add(48))?;
    }
    let cd_start = to_usize(cd_offset)?;
    let cd_end = cd_start
        .checked_add(to_usize(cd_size)?)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| corrupt("central directory lies outside the file (truncated?)"))?;
    // Each entry takes at least 46 bytes: a count beyond that is a lie we must not allocate for.
    if count > (cd_end - cd_start) as u64 / 46 {
        return Err(corrupt(format!(
            "central directory claims {count} entries in {} bytes",
            cd_end - cd_start
        )));
    }
    let mut records = Vec::with_capacity(count as usize);
    let mut at = cd_start;
    for _ in 0..count {
        if u32_at(bytes, at)? != CENTRAL_SIG {
            return Err(corrupt(format!(
                "bad central directory entry signature at offset {at}"
            )));
        }
        let method = u16_at(bytes, at + 10)?;
        let crc32 = u32_at(bytes, at + 16)?;
        let mut compressed_size = u32_at(bytes, at + 20)? as u64;
        let mut size = u32_at(bytes, at + 24)? as u64;
        let name_len = u16_at(bytes, at + 28)? as usize;
        let extra_len = u16_at(bytes, at + 30)? as usize;
        let comment_len = u16_at(bytes, at + 32)? as usize;
        let mut header_offset = u32_at(bytes, at + 42)? as u64;
        let name_bytes = bytes
            .get(at + 46..at + 46 + name_len)
            .ok_or_else(|| corrupt("central directory name past end"))?;
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        let extra = bytes
            .get(at + 46 + name_len..at + 46 + name_len + extra_len)
            .ok_or_else(|| corrupt("central directory extra field past end"))?;
        apply_zip64_extra(extra, &mut size, &mut compressed_size, &mut header_offset)?;
        at += 46 + name_len + extra_len + comment_len;

        let lh = to_usize(header_offset)?;
        if u32_at(bytes, lh)? != LOCAL_SIG {
            return Err(corrupt(format!(
                "record {name}: no local header at offset {lh}"
            )));
        }
        let local_name_len = u16_at(bytes, lh.saturating_add(26))? as u64;
        let local_extra_len = u16_at(bytes, lh.saturating_add(28))? as u64;
        let data_offset = header_offset + 30 + local_name_len + local_extra_len;
        if data_offset
            .checked_add(compressed_size)
            .is_none_or(|end| end > bytes.len() as u64)
        {
            return Err(corrupt(format!(
                "record {name}: {compressed_size} bytes at offset {data_offset} run past the end of the file (truncated?)"
            )));
        }
        records.push(ZipRecord {
            name,
            method,
            crc32,
            size,
            compressed_size,
            data_offset,
        });
    }
    Ok(records)
}

/// Replaces saturated central-directory fields by their zip64 extra values, in the order the zip spec fixes.
fn apply_zip64_extra(
    extra: &[u8],
    size: &mut u64,
    csize: &mut u64,
    offset: &mut u64,
) -> Result<()> {
    let mut at = 0;
    while at + 4 <= extra.len() {
        let id = u16_at(extra, at)?;
        let len = u16_at(extra, at + 2)? as usize;
        let body = extra
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| corrupt("zip extra field past end"))?;
        if id == 1 {
            let mut p = 0;
            for field in [size, csize, offset] {
                if *field == SATURATED {
                    *field = u64_at(body, p)?;
                    p += 8;
                }
            }
            return Ok(());
        }
        at += 4 + len;
    }
    Ok(())
}

/// The zip64 extra field (id 1) miniz writes when the size or the header offset does not fit in 32 bits:
/// `[size, compressed size]` if the size is saturated, then `[offset]` if the offset is; empty otherwise.
fn zip64_extra(size: u64, compressed_size: u64, header_offset: u64) -> Vec<u8> {
    let big_size = size >= SATURATED;
    let big_offset = header_offset >= SATURATED;
    let mut extra = Vec::new();
    if big_size || big_offset {
        let len = if big_size { 16u16 } else { 0 } + if big_offset { 8 } else { 0 };
        extra.extend_from_slice(&1u16.to_le_bytes());
        extra.extend_from_slice(&len.to_le_bytes());
        if big_size {
            extra.extend_from_slice(&size.to_le_bytes());
            extra.extend_from_slice(&compressed_size.to_le_bytes());
        }
        if big_offset {
            extra.extend_from_slice(&header_offset.to_le_bytes());
        }
    }
    extra
}

/// An entry already written, kept for the central directory.
struct WrittenEntry {
    name: String,
    crc32: u32,
    size: u64,
    header_offset: u64,
}

/// Streams a zip archive with torch's exact byte layout.
///
/// Call [`ZipWriter::start_record`] with the record's size (known up front, as torch knows it), write exactly
/// that many bytes through the `Write` impl, call [`ZipWriter::end_record`], and finally [`ZipWriter::finish`].
pub struct ZipWriter<W: Write> {
    out: W,
    cursor: u64,
    entries: Vec<WrittenEntry>,
    current: Option<(WrittenEntry, crc32fast::Hasher, u64)>,
}

impl<W: Write> ZipWriter<W> {
    /// Starts an archive at offset 0 of `out`.
    pub fn new(out: W) -> Self {
        ZipWriter {
            out,
            cursor: 0,
            entries: Vec::new(),
            current: None,
        }
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.cursor
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)?;
        self.cursor += bytes.len() as u64;
        Ok(())
    }

    /// Writes the local header of a record of `size` bytes named `name` (full name, `archive/record`).
    pub fn start_record(&mut self, name: &str, size: u64) -> Result<()> {
        if self.current.is_some() {
            return Err(FormatError::Invalid(
                "zip record started before the previous one ended".into(),
            ));
        }
        let header_offset = self.cursor;
        // miniz does not know the compressed size yet and writes 0 for it in the local header.
        let zip64 = zip64_extra(size, 0, header_offset);
        let start = header_offset + 30 + name.len() as u64 + zip64.len() as u64 + 4;
        let pad = (ALIGNMENT - start % ALIGNMENT) % ALIGNMENT;
        let flags: u16 = if size == 0 { 0x0800 } else { 0x0808 };
        let mut header = Vec::with_capacity(30 + name.len() + zip64.len() + 4 + pad as usize);
        header.extend_from_slice(&LOCAL_SIG.to_le_bytes());
        header.extend_from_slice(&0u16.to_le_bytes()); // version needed
        header.extend_from_slice(&flags.to_le_bytes());
        header.extend_from_slice(&[0u8; 18]); // method, time, date, crc, csize, usize
        header.extend_from_slice(&(name.len() as u16).to_le_bytes());
        header.extend_from_slice(&((zip64.len() as u64 + 4 + pad) as u16).to_le_bytes());
        header.extend_from_slice(name.as_bytes());
        header.extend_from_slice(&zip64);
        header.extend_from_slice(b"FB");
        header.extend_from_slice(&(pad as u16).to_le_bytes());
        header.resize(header.len() + pad as usize, b'Z');
        self.put(&header)?;
        let entry = WrittenEntry {
            name: name.to_string(),
            crc32: 0,
            size,
            header_offset,
        };
        self.current = Some((entry, crc32fast::Hasher::new(), 0));
        Ok(())
    }

    /// Ends the current record: checks its length and writes the data descriptor.
    pub fn end_record(&mut self) -> Result<()> {
        let (mut entry, hasher, written) = self
            .current
            .take()
            .ok_or_else(|| FormatError::Invalid("no zip record to end".into()))?;
        if written != entry.size {
            return Err(FormatError::Invalid(format!(
                "record {} declared {} bytes but {} were written",
                entry.name, entry.size, written
            )));
        }
        entry.crc32 = hasher.finalize();
        if entry.size > 0 {
            let mut d = Vec::with_capacity(24);
            d.extend_from_slice(&DESCRIPTOR_SIG.to_le_bytes());
            d.extend_from_slice(&entry.crc32.to_le_bytes());
            if entry.size >= SATURATED || entry.header_offset >= SATURATED {
                d.extend_from_slice(&entry.size.to_le_bytes());
                d.extend_from_slice(&entry.size.to_le_bytes());
            } else {
                d.extend_from_slice(&(entry.size as u32).to_le_bytes());
                d.extend_from_slice(&(entry.size as u32).to_le_bytes());
            }
            self.put(&d)?;
        }
        self.entries.push(entry);
        Ok(())
    }

    /// Writes a whole small record.
    pub fn write_record(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.start_record(name, data.len() as u64)?;
        self.write_all(data)?;
        self.end_record()
    }

    /// CRC-32s of the records written so far, in order (torch folds them into `.data/serialization_id`).
    pub fn record_crcs(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.entries.iter().map(|e| (e.size, e.crc32))
    }

    /// Writes the central directory and the zip64 + classic end records; returns the inner writer.
    pub fn finish(mut self) -> Result<W> {
        if self.current.is_some() {
            return Err(FormatError::Invalid(
                "zip archive finished inside a record".into(),
            ));
        }
        let cd_offset = self.cursor;
        let mut cd = Vec::new();
        for e in &self.entries {
            let zip64 = zip64_extra(e.size, e.size, e.header_offset);
            let size32 = e.size.min(SATURATED) as u32;
            let flags: u16 = if e.size == 0 { 0x0800 } else { 0x0808 };
            cd.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
            cd.extend_from_slice(&0u16.to_le_bytes()); // made by
            cd.extend_from_slice(&0u16.to_le_bytes()); // needed
            cd.extend_from_slice(&flags.to_le_bytes());
            cd.extend_from_slice(&[0u8; 6]); // method, time, date
            cd.extend_from_slice(&e.crc32.to_le_bytes());
            cd.extend_from_slice(&size32.to_le_bytes());
            cd.extend_from_slice(&size32.to_le_bytes());
            cd.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            cd.extend_from_slice(&(zip64.len() as u16).to_le_bytes());
            cd.extend_from_slice(&[0u8; 8]); // comment len, disk, internal attrs, external attrs (part)
            cd.extend_from_slice(&[0u8; 2]); // external attrs (rest)
            cd.extend_from_slice(&(e.header_offset.min(SATURATED) as u32).to_le_bytes());
            cd.extend_from_slice(e.name.as_bytes());
            cd.extend_from_slice(&zip64);
        }
        let n = self.entries.len() as u64;
        let cd_size = cd.len() as u64;
        self.put(&cd)?;
        let z64_offset = self.cursor;
        let mut end = Vec::with_capacity(98);
        end.extend_from_slice(&ZIP64_EOCD_SIG.to_le_bytes());
        end.extend_from_slice(&44u64.to_le_bytes());
        end.extend_from_slice(&0x031Eu16.to_le_bytes());
        end.extend_from_slice(&0x002Du16.to_le_bytes());
        end.extend_from_slice(&[0u8; 8]); // disk numbers
        end.extend_from_slice(&n.to_le_bytes());
        end.extend_from_slice(&n.to_le_bytes());
        end.extend_from_slice(&cd_size.to_le_bytes());
        end.extend_from_slice(&cd_offset.to_le_bytes());
        end.extend_from_slice(&ZIP64_LOCATOR_SIG.to_le_bytes());
        end.extend_from_slice(&0u32.to_le_bytes());
        end.extend_from_slice(&z64_offset.to_le_bytes());
        end.extend_from_slice(&1u32.to_le_bytes());
        end.extend_from_slice(&EOCD_SIG.to_le_bytes());
        end.extend_from_slice(&[0u8; 4]);
        end.extend_from_slice(&(n.min(0xFFFF) as u16).to_le_bytes());
        end.extend_from_slice(&(n.min(0xFFFF) as u16).to_le_bytes());
        end.extend_from_slice(&(cd_size.min(SATURATED) as u32).to_le_bytes());
        end.extend_from_slice(&(cd_offset.min(SATURATED) as u32).to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        self.put(&end)?;
        Ok(self.out)
    }
}

impl<W: Write> Write for ZipWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some((_, hasher, written)) = self.current.as_mut() else {
            return Err(std::io::Error::other("zip data written outside a record"));
        };
        hasher.update(buf);
        *written += buf.len() as u64;
        self.out.write_all(buf)?;
        self.cursor += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_torch_worked_example() {
        // Offsets from the torch 2.15 worked example (bf16_2x3.pt): data.pkl at 64, next header at 249...
        let mut z = ZipWriter::new(Vec::new());
        z.write_record("bf16_2x3/data.pkl", &[0u8; 169]).unwrap();
        assert_eq!(z.position(), 249);
        z.write_record("bf16_2x3/.format_version", b"1").unwrap();
        assert_eq!(z.position(), 337);
        z.write_record("bf16_2x3/.storage_alignment", b"64")
            .unwrap();
        assert_eq!(z.position(), 466);
        let bytes = z.finish().unwrap();
        let recs = read_central_directory(&bytes).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0].data_offset, 64);
        assert_eq!(recs[1].data_offset, 320);
        assert_eq!(recs[2].data_offset, 448);
        assert_eq!(recs[2].size, 2);
    }

    #[test]
    fn empty_record_has_no_descriptor() {
        let mut z = ZipWriter::new(Vec::new());
        z.write_record("a/data/0", &[]).unwrap();
        let after_empty = z.position();
        assert_eq!(after_empty % ALIGNMENT, 0);
        let bytes = z.finish().unwrap();
        assert_eq!(u16::from_le_bytes([bytes[6], bytes[7]]), 0x0800);
        let recs = read_central_directory(&bytes).unwrap();
        assert_eq!(recs[0].size, 0);
    }

    #[test]
    fn truncated_archives_are_errors() {
        let mut z = ZipWriter::new(Vec::new());
        z.write_record("a/data.pkl", b"hello").unwrap();
        let bytes = z.finish().unwrap();
        for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                read_central_directory(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn offsets_near_the_address_limit_are_errors_not_overflows() {
        // Found by fuzzing: a zip64 locator or local header offset close to usize::MAX.
        let mut z = ZipWriter::new(Vec::new());
        z.write_record("a/data.pkl", b"hello").unwrap();
        let bytes = z.finish().unwrap();
        let locator = bytes
            .windows(4)
            .rposition(|w| w == ZIP64_LOCATOR_SIG.to_le_bytes())
            .unwrap();
        for bad in [u64::MAX, u64::MAX - 10, usize::MAX as u64 - 30] {
            let mut b = bytes.clone();
            b[locator + 8..locator + 16].copy_from_slice(&bad.to_le_bytes());
            assert!(read_central_directory(&b).is_err());
        }
        let central = bytes
            .windows(4)
            .position(|w| w == CENTRAL_SIG.to_le_bytes())
            .unwrap();
        let mut b = bytes.clone();
        b[central + 42..central + 46].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        assert!(read_central_directory(&b).is_err());
    }

    #[test]
    fn wrong_length_is_refused() {
        let mut z = ZipWriter::new(Vec::new());
        z.start_record("a/x", 4).unwrap();
        z.write_all(b"abc").unwrap();
        assert!(z.end_record().is_err());
    }
}
