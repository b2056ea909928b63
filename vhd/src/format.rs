//! On-disk structures of the VHD format (all big-endian): the 512-byte footer, the 1024-byte
//! dynamic header with its parent locators, the blktap batmap header, and their checksums.
//! Parsing never panics on any input; errors name the field and its byte offset.

use crate::error::{Error, Result};
use uuid::Uuid;

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// Size of the footer.
pub const FOOTER_SIZE: usize = 512;
/// Size of the dynamic header.
pub const HEADER_SIZE: usize = 1024;
/// Footer cookie.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Dynamic header cookie.
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// blktap batmap cookie.
pub const BATMAP_COOKIE: &[u8; 8] = b"tdbatmap";
/// BAT value of an unallocated block.
pub const BAT_UNUSED: u32 = 0xFFFF_FFFF;
/// Largest virtual size accepted (2040 GiB, the format's practical limit).
pub const MAX_VIRTUAL_SIZE: u64 = 2040 << 30;
/// Default block size (2 MiB).
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Smallest block size accepted.
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// Largest block size accepted.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Offset of the hidden byte (blktap extension) in the footer.
pub const HIDDEN_OFFSET: usize = 85;
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01T00:00:00Z).
pub const VHD_EPOCH: u64 = 946_684_800;

/// Platform code of a Windows relative Unicode (UTF-16LE) locator.
pub const PLAT_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
/// Platform code of a Windows absolute Unicode (UTF-16LE) locator.
pub const PLAT_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
/// Platform code of a Mac OS X (UTF-8 `file://` URL) locator.
pub const PLAT_MACX: u32 = u32::from_be_bytes(*b"MacX");

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// One's complement of the byte sum, skipping the 4 checksum bytes at `skip`.
pub fn checksum(bytes: &[u8], skip: usize) -> u32 {
    let mut sum: u32 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if i >= skip && i < skip + 4 {
            continue;
        }
        sum = sum.wrapping_add(b as u32);
    }
    !sum
}

/// Round `v` up to a multiple of `to` (a power of two).
pub fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// The current time as a VHD timestamp (seconds since 2000-01-01 UTC).
pub fn vhd_now() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH);
    unix.saturating_sub(VHD_EPOCH).min(u32::MAX as u64) as u32
}

/// Converts a Unix time to a VHD timestamp.
pub fn vhd_time(unix_secs: u64) -> u32 {
    unix_secs.saturating_sub(VHD_EPOCH).min(u32::MAX as u64) as u32
}

/// The kind of disk a footer describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// Raw data followed by a footer.
    Fixed,
    /// Sparse disk with a BAT.
    Dynamic,
    /// Sparse disk layered on a parent.
    Differencing,
}

impl DiskType {
    /// The footer's numeric code.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// CHS geometry as the VHD specification computes it from a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}

impl Geometry {
    /// The specification's geometry for a disk of `size` bytes.
    pub fn for_size(size: u64) -> Geometry {
        let mut total = size / SECTOR;
        if total > 65535 * 16 * 255 {
            total = 65535 * 16 * 255;
        }
        let (spt, heads, cth);
        if total >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cth = total / spt;
        } else {
            let mut s = 17u64;
            let mut c = total / s;
            let mut h = c.div_ceil(1024).max(4);
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = total / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = total / s;
            }
            spt = s;
            heads = h;
            cth = c;
        }
        Geometry {
            cylinders: (cth / heads).min(65535) as u16,
            heads: heads as u8,
            sectors: spt as u8,
        }
    }
    /// Bytes addressed by this geometry.
    pub fn size(&self) -> u64 {
        self.cylinders as u64 * self.heads as u64 * self.sectors as u64 * SECTOR
    }
}

/// The 512-byte footer (also copied at offset 0 of dynamic and differencing disks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Features field (2 = reserved bit always set).
    pub features: u32,
    /// Format version (0x00010000).
    pub version: u32,
    /// Offset of the dynamic header (`u64::MAX` for fixed disks).
    pub data_offset: u64,
    /// Creation time (seconds since 2000-01-01).
    pub timestamp: u32,
    /// Creator application (e.g. `tap\0`, `qemu`, `vpc `).
    pub creator_app: [u8; 4],
    /// Creator version.
    pub creator_version: u32,
    /// Creator host OS.
    pub creator_os: u32,
    /// Size at creation.
    pub original_size: u64,
    /// Current virtual size in bytes.
    pub current_size: u64,
    /// CHS geometry.
    pub geometry: Geometry,
    /// Disk type.
    pub disk_type: DiskType,
    /// Unique id of this disk.
    pub uuid: Uuid,
    /// Saved-state flag.
    pub saved_state: u8,
    /// blktap's hidden flag (byte 85).
    pub hidden: u8,
}

impl Footer {
    /// Parses a footer read at `offset` of `file`, verifying cookie, checksum and fields.
    pub fn parse(b: &[u8], file: &str, offset: u64) -> Result<Footer> {
        if b.len() < FOOTER_SIZE {
            return Err(Error::corrupt(
                file,
                "footer",
                offset,
                "shorter than 512 bytes",
            ));
        }
        let b = &b[..FOOTER_SIZE];
        if &b[0..8] != FOOTER_COOKIE {
            return Err(Error::corrupt(
                file,
                "footer cookie",
                offset,
                format!(
                    "expected \"conectix\", found {:?}",
                    String::from_utf8_lossy(&b[0..8])
                ),
            ));
        }
        let stored = be32(b, 64);
        let computed = checksum(b, 64);
        if stored != computed {
            return Err(Error::Checksum {
                file: file.into(),
                structure: "footer",
                offset,
                stored,
                computed,
            });
        }
        let disk_type = match be32(b, 60) {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            t => {
                return Err(Error::corrupt(
                    file,
                    "footer disk type",
                    offset + 60,
                    format!("{t} is not 2 (fixed), 3 (dynamic) or 4 (differencing)"),
                ))
            }
        };
        let current_size = be64(b, 48);
        if current_size > MAX_VIRTUAL_SIZE {
            return Err(Error::corrupt(
                file,
                "footer current size",
                offset + 48,
                format!("{current_size} bytes exceeds the 2040 GiB limit"),
            ));
        }
        let data_offset = be64(b, 16);
        if disk_type != DiskType::Fixed && (data_offset < 512 || data_offset == u64::MAX) {
            return Err(Error::corrupt(
                file,
                "footer data offset",
                offset + 16,
                format!("{data_offset:#x} does not point at a dynamic header"),
            ));
        }
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&b[28..32]);
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[68..84]);
        Ok(Footer {
            features: be32(b, 8),
            version: be32(b, 12),
            data_offset,
            timestamp: be32(b, 24),
            creator_app,
            creator_version: be32(b, 32),
            creator_os: be32(b, 36),
            original_size: be64(b, 40),
            current_size,
            geometry: Geometry {
                cylinders: be16(b, 56),
                heads: b[58],
                sectors: b[59],
            },
            disk_type,
            uuid: Uuid::from_bytes(id),
            saved_state: b[84],
            hidden: b[85],
        })
    }

    /// Serialises with a fresh checksum.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[0..8].copy_from_slice(FOOTER_COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_os.to_be_bytes());
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.geometry.cylinders.to_be_bytes());
        b[58] = self.geometry.heads;
        b[59] = self.geometry.sectors;
        b[60..64].copy_from_slice(&self.disk_type.code().to_be_bytes());
        b[68..84].copy_from_slice(self.uuid.as_bytes());
        b[84] = self.saved_state;
        b[HIDDEN_OFFSET] = self.hidden;
        let c = checksum(&b, 64);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        b
    }

    /// A new footer for a disk of `size` bytes written by this engine (creator `tap\0`, as
    /// blktap, so that qemu sizes it by `current_size` rather than by CHS geometry).
    pub fn new(disk_type: DiskType, size: u64, uuid: Uuid) -> Footer {
        Footer {
            features: 2,
            version: 0x0001_0000,
            data_offset: if disk_type == DiskType::Fixed {
                u64::MAX
            } else {
                512
            },
            timestamp: vhd_now(),
            creator_app: *b"tap\0",
            creator_version: 0x0001_0003,
            // blktap's libvhd writes 0 here (no host OS).
            creator_os: 0,
            original_size: size,
            current_size: size,
            geometry: Geometry::for_size(size),
            disk_type,
            uuid,
            saved_state: 0,
            hidden: 0,
        }
    }

    /// True when this footer promises a blktap batmap after the BAT: creator `tap` version 1.2
    /// or later on a dynamic or differencing disk (libvhd's `vhd_has_batmap`; version 1.1 files
    /// may or may not have one, so one is used when found but not demanded).
    pub fn promises_batmap(&self) -> bool {
        self.disk_type != DiskType::Fixed
            && &self.creator_app[..3] == b"tap"
            && self.creator_version >= 0x0001_0002
    }

    /// Creator application as text.
    pub fn creator(&self) -> String {
        String::from_utf8_lossy(&self.creator_app)
            .trim_end_matches(['\0', ' '])
            .to_string()
    }
}

/// One of the eight parent locator entries of a dynamic header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParentLocator {
    /// Platform code (`W2ru`, `W2ku`, `MacX`, 0 = unused).
    pub code: u32,
    /// Space reserved for the data (sectors per the specification; some tools store bytes).
    pub data_space: u32,
    /// Length of the data in bytes.
    pub data_len: u32,
    /// Reserved.
    pub reserved: u32,
    /// Byte offset of the data in the file.
    pub data_offset: u64,
}

impl ParentLocator {
    /// Bytes reserved for the data, reading `data_space` as sectors or as bytes: values that
    /// are a multiple of 512 and at least as large as the data length are taken as bytes.
    pub fn space_bytes(&self) -> u64 {
        let ds = self.data_space as u64;
        if ds >= SECTOR && ds % SECTOR == 0 && ds >= self.data_len as u64 {
            ds
        } else {
            ds * SECTOR
        }
    }
    /// Platform code as text.
    pub fn code_name(&self) -> String {
        let b = self.code.to_be_bytes();
        if b.iter().all(|c| c.is_ascii_graphic()) {
            String::from_utf8_lossy(&b).into_owned()
        } else {
            format!("{:#010x}", self.code)
        }
    }
}

/// The 1024-byte dynamic disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Next structure (unused, `u64::MAX`).
    pub data_offset: u64,
    /// Byte offset of the BAT.
    pub table_offset: u64,
    /// Header version (0x00010000).
    pub version: u32,
    /// Number of BAT entries.
    pub max_table_entries: u32,
    /// Block size in bytes.
    pub block_size: u32,
    /// Parent's unique id (differencing disks).
    pub parent_uuid: Uuid,
    /// Parent's modification time (seconds since 2000-01-01).
    pub parent_timestamp: u32,
    /// Parent's file name, UTF-16BE on disk.
    pub parent_name: String,
    /// Parent locator entries.
    pub locators: [ParentLocator; 8],
}

impl Header {
    /// Parses a header read at `offset`, verifying cookie, checksum and block size.
    pub fn parse(b: &[u8], file: &str, offset: u64) -> Result<Header> {
        if b.len() < HEADER_SIZE {
            return Err(Error::corrupt(
                file,
                "dynamic header",
                offset,
                "shorter than 1024 bytes",
            ));
        }
        let b = &b[..HEADER_SIZE];
        if &b[0..8] != HEADER_COOKIE {
            return Err(Error::corrupt(
                file,
                "dynamic header cookie",
                offset,
                format!(
                    "expected \"cxsparse\", found {:?}",
                    String::from_utf8_lossy(&b[0..8])
                ),
            ));
        }
        let stored = be32(b, 36);
        let computed = checksum(b, 36);
        if stored != computed {
            return Err(Error::Checksum {
                file: file.into(),
                structure: "dynamic header",
                offset,
                stored,
                computed,
            });
        }
        let block_size = be32(b, 32);
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::corrupt(
                file,
                "dynamic header block size",
                offset + 32,
                format!("{block_size} is not a power of two between 4 KiB and 256 MiB"),
            ));
        }
        let mut pid = [0u8; 16];
        pid.copy_from_slice(&b[40..56]);
        let name_raw: Vec<u16> = (0..256)
            .map(|i| be16(b, 64 + 2 * i))
            .take_while(|&c| c != 0)
            .collect();
        let parent_name = String::from_utf16_lossy(&name_raw);
        let mut locators = [ParentLocator::default(); 8];
        for (i, l) in locators.iter_mut().enumerate() {
            let o = 576 + 24 * i;
            *l = ParentLocator {
                code: be32(b, o),
                data_space: be32(b, o + 4),
                data_len: be32(b, o + 8),
                reserved: be32(b, o + 12),
                data_offset: be64(b, o + 16),
            };
        }
        Ok(Header {
            data_offset: be64(b, 8),
            table_offset: be64(b, 16),
            version: be32(b, 24),
            max_table_entries: be32(b, 28),
            block_size,
            parent_uuid: Uuid::from_bytes(pid),
            parent_timestamp: be32(b, 56),
            parent_name,
            locators,
        })
    }

    /// Serialises with a fresh checksum.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(HEADER_COOKIE);
        b[8..16].copy_from_slice(&self.data_offset.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.version.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(self.parent_uuid.as_bytes());
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        for (i, c) in self.parent_name.encode_utf16().take(256).enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&c.to_be_bytes());
        }
        for (i, l) in self.locators.iter().enumerate() {
            let o = 576 + 24 * i;
            b[o..o + 4].copy_from_slice(&l.code.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&l.data_space.to_be_bytes());
            b[o + 8..o + 12].copy_from_slice(&l.data_len.to_be_bytes());
            b[o + 12..o + 16].copy_from_slice(&l.reserved.to_be_bytes());
            b[o + 16..o + 24].copy_from_slice(&l.data_offset.to_be_bytes());
        }
        let c = checksum(&b, 36);
        b[36..40].copy_from_slice(&c.to_be_bytes());
        b
    }

    /// Bytes of the bitmap that precedes each block's data, rounded up to whole sectors.
    pub fn bitmap_bytes(&self) -> u64 {
        round_up((self.block_size as u64 / SECTOR).div_ceil(8), SECTOR)
    }
}

/// Version of the batmap this engine writes (blktap's `VHD_BATMAP_CURRENT_VERSION`, 1.2).
pub const BATMAP_VERSION: u32 = 0x0001_0002;

/// blktap's batmap header, in the sector after the BAT: "tdbatmap", the byte offset of the map
/// (u64), its size in sectors (u32), the version (u32), the checksum of the map (u32), then a
/// marker byte and a key hash this engine neither uses nor changes. The map holds one bit per
/// block, most significant bit first; a set bit says the block is wholly written (every bit of
/// its sector bitmap set), so a reader may skip the block's bitmap. A clear bit says nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatmapHeader {
    /// Byte offset of the batmap data.
    pub offset: u64,
    /// Size of the batmap data in sectors.
    pub size_sectors: u32,
    /// Batmap version.
    pub version: u32,
    /// Checksum of the batmap data.
    pub checksum: u32,
}

impl BatmapHeader {
    /// Parses a batmap header; `None` when the cookie is absent.
    pub fn parse(b: &[u8]) -> Option<BatmapHeader> {
        if b.len() < 32 || &b[0..8] != BATMAP_COOKIE {
            return None;
        }
        Some(BatmapHeader {
            offset: be64(b, 8),
            size_sectors: be32(b, 16),
            version: be32(b, 20),
            checksum: be32(b, 24),
        })
    }

    /// A new header for a map of `size_sectors` sectors at byte `offset`, with its checksum.
    pub fn new(offset: u64, size_sectors: u32, checksum: u32) -> BatmapHeader {
        BatmapHeader {
            offset,
            size_sectors,
            version: BATMAP_VERSION,
            checksum,
        }
    }

    /// Writes the fields into `sector` (a header sector read from a file, or zeros), keeping
    /// every other byte (marker, key hash) as it is.
    pub fn write_into(&self, sector: &mut [u8; SECTOR as usize]) {
        sector[0..8].copy_from_slice(BATMAP_COOKIE);
        sector[8..16].copy_from_slice(&self.offset.to_be_bytes());
        sector[16..20].copy_from_slice(&self.size_sectors.to_be_bytes());
        sector[20..24].copy_from_slice(&self.version.to_be_bytes());
        sector[24..28].copy_from_slice(&self.checksum.to_be_bytes());
    }

    /// The header as a fresh 512-byte sector (marker and key hash zero, as libvhd creates it).
    pub fn to_bytes(&self) -> [u8; SECTOR as usize] {
        let mut b = [0u8; SECTOR as usize];
        self.write_into(&mut b);
        b
    }
}

/// Sectors of batmap for `entries` blocks (at least one, as libvhd sizes it).
pub fn batmap_sectors(entries: u64) -> u64 {
    entries.div_ceil(8).div_ceil(SECTOR).max(1)
}

/// The batmap checksum as libvhd computes it: the one's complement of the byte sum of the first
/// `max(1, ⌈(virtual size / 16 MiB) / 512⌉)` sectors of the map (libvhd counts 2 MiB blocks
/// whatever the block size), capped at the map's length; version 1.1 maps summed their bytes
/// as signed chars.
pub fn batmap_checksum(map: &[u8], version: u32, virtual_size: u64) -> u32 {
    let sectors = (virtual_size >> 24).div_ceil(SECTOR).max(1);
    let n = (sectors * SECTOR).min(map.len() as u64) as usize;
    let mut sum: u32 = 0;
    for &b in &map[..n] {
        sum = sum.wrapping_add(if version == 0x0001_0001 {
            b as i8 as i32 as u32
        } else {
            b as u32
        });
    }
    !sum
}

/// True when bit `block` of a batmap (most significant bit first) is set.
pub fn batmap_bit(map: &[u8], block: u64) -> bool {
    usize::try_from(block / 8)
        .ok()
        .and_then(|i| map.get(i))
        .is_some_and(|b| b & (0x80 >> (block % 8)) != 0)
}

/// Decodes a parent locator's data into a path text (`/` separators): UTF-16LE for `W2ru`/`W2ku`,
/// UTF-8 with an optional `file://` prefix for `MacX`. `None` for unknown platforms or bad text.
pub fn decode_locator(code: u32, data: &[u8]) -> Option<String> {
    let text = match code {
        PLAT_W2RU | PLAT_W2KU => {
            let u: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&c| c != 0)
                .collect();
            String::from_utf16(&u).ok()?.replace('\\', "/")
        }
        PLAT_MACX => {
            let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
            let s = std::str::from_utf8(&data[..end]).ok()?;
            s.strip_prefix("file://").unwrap_or(s).to_string()
        }
        _ => return None,
    };
    if text.is_empty() {
        None
    } else {
        Some(text)
    }
}

/// Encodes a relative path as blktap does: `MacX` as UTF-8 `file://` URL, `W2ru`/`W2ku` as
/// UTF-16LE with backslashes.
pub fn encode_locator(code: u32, rel_path: &str) -> Vec<u8> {
    match code {
        PLAT_MACX => format!("file://{rel_path}").into_bytes(),
        _ => rel_path
            .replace('/', "\\")
            .encode_utf16()
            .flat_map(|c| c.to_le_bytes())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footer_round_trips_and_detects_corruption_by_field() {
        let f = Footer::new(DiskType::Dynamic, 64 << 20, Uuid::new_v4());
        let b = f.to_bytes();
        assert_eq!(Footer::parse(&b, "t", 0).unwrap(), f);
        let mut bad = b;
        bad[50] ^= 1;
        assert!(matches!(
            Footer::parse(&bad, "t", 0),
            Err(Error::Checksum {
                structure: "footer",
                ..
            })
        ));
        let mut bad = b;
        bad[0] = b'x';
        let e = Footer::parse(&bad, "t", 1024).unwrap_err().to_string();
        assert!(e.contains("footer cookie") && e.contains("1024"), "{e}");
    }

    #[test]
    fn header_round_trips_with_parent_name_and_locators() {
        let mut h = Header {
            data_offset: u64::MAX,
            table_offset: 1536,
            version: 0x10000,
            max_table_entries: 32,
            block_size: DEFAULT_BLOCK_SIZE,
            parent_uuid: Uuid::new_v4(),
            parent_timestamp: 1234,
            parent_name: "pärent.vhd".into(),
            locators: Default::default(),
        };
        h.locators[0] = ParentLocator {
            code: PLAT_MACX,
            data_space: 1,
            data_len: 20,
            reserved: 0,
            data_offset: 2048,
        };
        let b = h.to_bytes();
        assert_eq!(Header::parse(&b, "t", 512).unwrap(), h);
        assert_eq!(h.bitmap_bytes(), 512);
    }

    #[test]
    fn geometry_follows_the_specification_algorithm() {
        // 64 MiB: 17 sectors/track, 8 heads, 963 cylinders (qemu instead rounds the size up
        // until CHS covers it, giving 67,125,248 bytes for `qemu-img create 64M`).
        let g = Geometry::for_size(64 << 20);
        assert_eq!((g.cylinders, g.heads, g.sectors), (963, 8, 17));
        assert_eq!(g.size(), 67_055_616);
        let g = Geometry::for_size(67_125_248);
        assert_eq!(g.size(), 67_125_248);
    }

    #[test]
    fn locators_round_trip_in_every_encoding() {
        for code in [PLAT_MACX, PLAT_W2KU, PLAT_W2RU] {
            let d = encode_locator(code, "./sub/p.vhd");
            assert_eq!(decode_locator(code, &d).unwrap(), "./sub/p.vhd");
        }
        assert_eq!(decode_locator(PLAT_W2RU, &[]), None);
    }

    #[test]
    fn locator_space_is_read_as_sectors_or_bytes() {
        let mut l = ParentLocator {
            data_space: 1,
            data_len: 40,
            ..Default::default()
        };
        assert_eq!(l.space_bytes(), 512);
        l.data_space = 512;
        assert_eq!(l.space_bytes(), 512);
        l.data_space = 2;
        assert_eq!(l.space_bytes(), 1024);
    }
}
