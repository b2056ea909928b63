//! Parent locators: whatever text a locator holds, a resolved parent is inside the root.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use vhd::format::{PLAT_MACX, PLAT_W2KU, PLAT_W2RU};
use vhd::{create_dynamic_io, resolve_parent, BlockIo, CreateOptions, Disk, MemFile, ParentRef};

/// A root `sr/` holding `base.vhd`, beside an `outside.vhd` the root must never reach.
fn dirs() -> &'static (PathBuf, PathBuf) {
    static D: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    D.get_or_init(|| {
        let top = std::env::temp_dir().join(format!("ddstor-fuzz-locators-{}", std::process::id()));
        let sr = top.join("sr");
        std::fs::create_dir_all(&sr).unwrap();
        for p in [sr.join("base.vhd"), top.join("outside.vhd")] {
            if !p.exists() {
                vhd::create_dynamic(&p, 1 << 20, &CreateOptions::default()).unwrap();
            }
        }
        let _ = std::os::unix::fs::symlink(top.join("outside.vhd"), sr.join("link.vhd"));
        (sr.canonicalize().unwrap(), top)
    })
}

fuzz_target!(|data: &[u8]| {
    let (sr, _) = dirs();
    let Some((&sel, text)) = data.split_first() else { return };
    let code = [PLAT_MACX, PLAT_W2KU, PLAT_W2RU][sel as usize % 3];
    let m = Arc::new(MemFile::new());
    let pref = ParentRef { uuid: uuid_of(&sr.join("base.vhd")), timestamp: 0, name: String::new(), relative_path: "x".into() };
    create_dynamic_io(m.as_ref(), "fuzz", 1 << 20, &CreateOptions::default(), Some(&pref)).unwrap();
    // Replace the chosen locator's data with the fuzz text (within its reserved space).
    let disk = Disk::from_io(m.clone(), "fuzz", false).unwrap();
    let mut h = disk.header().unwrap().clone();
    let l = h.locators.iter_mut().find(|l| l.code == code).unwrap();
    let n = text.len().min(l.space_bytes() as usize);
    m.write_at(&text[..n], l.data_offset).unwrap();
    l.data_len = n as u32;
    for other in h.locators.iter_mut().filter(|o| o.code != code) {
        *other = Default::default();
    }
    h.parent_name = String::new();
    m.write_at(&h.to_bytes(), 512).unwrap();
    // Locator text can make the layout invalid (e.g. a "tdbatmap" cookie right after the BAT
    // reads as an overlapping batmap header): that is a clear error, not a crash.
    let Ok(disk) = Disk::from_io(m, "fuzz", false) else { return };
    if let Ok(p) = resolve_parent(&disk, &sr.join("child.vhd"), sr) {
        assert!(p.starts_with(sr), "resolved {} outside the root {}", p.display(), sr.display());
    }
});

fn uuid_of(p: &std::path::Path) -> vhd::Uuid {
    Disk::open(p, false).unwrap().uuid()
}
