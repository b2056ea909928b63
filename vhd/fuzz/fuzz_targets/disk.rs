//! Whole files (footer, header, BAT, batmap, bitmaps): opening never panics; a file that opens
//! can be read, mapped and checked; its read plan names exactly the bytes a read returns;
//! writing into it keeps it openable and its data readable, and keeps a true batmap true (no
//! set bit for a block that is not wholly written, and after the flush a bit for every block
//! the write made whole).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use vhd::format::{checksum, FOOTER_SIZE, HEADER_SIZE};
use vhd::{check_io, BlockIo, Chain, Disk, MemFile};

fn fix_checksums(b: &mut [u8]) {
    let n = b.len();
    if n < FOOTER_SIZE {
        return;
    }
    for off in [0, n - FOOTER_SIZE] {
        let c = checksum(&b[off..off + FOOTER_SIZE], 64);
        b[off + 64..off + 68].copy_from_slice(&c.to_be_bytes());
    }
    let hoff = u64::from_be_bytes(b[n - FOOTER_SIZE + 16..n - FOOTER_SIZE + 24].try_into().unwrap());
    if let Some(h) = usize::try_from(hoff).ok().filter(|&h| h.checked_add(HEADER_SIZE).is_some_and(|e| e <= n)) {
        let c = checksum(&b[h..h + HEADER_SIZE], 36);
        b[h + 36..h + 40].copy_from_slice(&c.to_be_bytes());
    }
}

/// True when every set batmap bit of `d` names a wholly written block.
fn batmap_true(d: &Disk) -> bool {
    (0..d.bat_entries() as u64).all(|b| {
        !d.batmap_bit(b) || d.presence(b).ok().flatten().is_some_and(|bm| bm.is_full())
    })
}

/// True when the engine keeps this disk's batmap (a readable map of a version it writes).
fn batmap_kept(d: &Disk) -> bool {
    d.batmap().is_some_and(|h| h.version <= vhd::format::BATMAP_VERSION && h.offset % 512 == 0 && h.offset != 0 && (h.size_sectors as u64) << 12 >= d.bat_entries() as u64)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let mut bytes = rest.to_vec();
    if flags & 1 == 1 {
        fix_checksums(&mut bytes);
    }
    let _ = check_io(Arc::new(MemFile::from_bytes(bytes.clone())), "fuzz");
    let mem = Arc::new(MemFile::from_bytes(bytes));
    let Ok(disk) = Disk::from_io(mem.clone(), "fuzz", true) else { return };
    if disk.disk_type() == vhd::DiskType::Differencing {
        return; // needs a parent; covered by the locators target
    }
    let batmap_was_true = batmap_true(&disk);
    let Ok(chain) = Chain::from_layers(vec![disk], vec![], true) else { return };
    let size = chain.virtual_size();
    let span = size.min(1 << 20);
    let mut buf = vec![0u8; span as usize];
    chain.read_at(&mut buf, 0).expect("read of an opened disk");
    chain.read_at(&mut buf, size - span).expect("read of an opened disk");
    chain.block_status(0, span).expect("block status");
    // The read plan (what zero-copy replies splice) names the bytes the read returned.
    let plan = chain.read_plan(size - span, span).expect("read plan of an opened disk");
    let mut via_plan = Vec::with_capacity(span as usize);
    for p in plan {
        match p.source {
            vhd::PieceSource::Zero => via_plan.resize(via_plan.len() + p.len as usize, 0),
            vhd::PieceSource::File { layer, file_offset } => {
                let mut b = vec![0u8; p.len as usize];
                chain.layers()[layer].io().read_at(&mut b, file_offset).expect("planned bytes lie in the file");
                via_plan.extend_from_slice(&b);
            }
        }
    }
    assert!(via_plan == buf, "read plan differs from the read");
    if size >= 1024 {
        let off = (flags as u64 * 512) % (size - 512);
        chain.write_at(&[0xA5; 1000], off.min(size - 1000)).expect("write into an opened disk");
        chain.flush().expect("flush of an opened disk");
        drop(chain);
        let reopened = Disk::from_io(Arc::new(MemFile::from_bytes(mem.to_bytes())), "fuzz", false)
            .expect("a written disk reopens");
        if batmap_was_true && reopened.batmap().is_some() {
            assert!(batmap_true(&reopened), "a write made the batmap claim a partial block");
            let first = off.min(size - 1000) / reopened.block_size();
            for b in first..=(off.min(size - 1000) + 999) / reopened.block_size() {
                let full = reopened.presence(b).ok().flatten().is_some_and(|bm| bm.is_full());
                if full && batmap_kept(&reopened) {
                    assert!(reopened.batmap_bit(b), "block {b} is whole after the flush but its batmap bit is clear");
                }
            }
        }
        let c = Chain::from_layers(vec![reopened], vec![], false).unwrap();
        let mut b = vec![0u8; 1000];
        c.read_at(&mut b, off.min(size - 1000)).unwrap();
        assert!(b.iter().all(|&x| x == 0xA5), "written data reads back");
    }
    let _ = mem.len();
});
