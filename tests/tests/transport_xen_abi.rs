//! The xen backend's ioctl numbers and structure layouts equal those of the installed Linux
//! uapi headers (`/usr/include/xen/{gntalloc,gntdev,evtchn}.h`, package linux-libc-dev).

use std::collections::HashMap;
use std::mem::{offset_of, size_of};
use std::process::Command;
use transport::vchan::xen::abi::*;

fn c_values() -> HashMap<String, u64> {
    let gcc = ddstor_e2e::require_tool("gcc", "gcc");
    for h in ["gntalloc", "gntdev", "evtchn"] {
        let p = format!("/usr/include/xen/{h}.h");
        assert!(
            std::path::Path::new(&p).exists(),
            "{p} missing: install Debian package linux-libc-dev"
        );
    }
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/c/xen_abi.c");
    let tmp = tempfile::tempdir().unwrap();
    let exe = tmp.path().join("xen_abi");
    let out = Command::new(gcc)
        .arg("-o")
        .arg(&exe)
        .arg(src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "compiling xen_abi.c: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn ioctl_numbers_and_layouts_match_the_linux_uapi_headers() {
    let c = c_values();
    let rust: Vec<(&str, u64)> = vec![
        ("IOCTL_GNTALLOC_ALLOC_GREF", IOCTL_GNTALLOC_ALLOC_GREF),
        ("IOCTL_GNTALLOC_DEALLOC_GREF", IOCTL_GNTALLOC_DEALLOC_GREF),
        (
            "IOCTL_GNTALLOC_SET_UNMAP_NOTIFY",
            IOCTL_GNTALLOC_SET_UNMAP_NOTIFY,
        ),
        ("IOCTL_GNTDEV_MAP_GRANT_REF", IOCTL_GNTDEV_MAP_GRANT_REF),
        ("IOCTL_GNTDEV_UNMAP_GRANT_REF", IOCTL_GNTDEV_UNMAP_GRANT_REF),
        (
            "IOCTL_GNTDEV_SET_UNMAP_NOTIFY",
            IOCTL_GNTDEV_SET_UNMAP_NOTIFY,
        ),
        (
            "IOCTL_EVTCHN_BIND_INTERDOMAIN",
            IOCTL_EVTCHN_BIND_INTERDOMAIN,
        ),
        (
            "IOCTL_EVTCHN_BIND_UNBOUND_PORT",
            IOCTL_EVTCHN_BIND_UNBOUND_PORT,
        ),
        ("IOCTL_EVTCHN_UNBIND", IOCTL_EVTCHN_UNBIND),
        ("IOCTL_EVTCHN_NOTIFY", IOCTL_EVTCHN_NOTIFY),
        (
            "sizeof(struct ioctl_gntalloc_alloc_gref)",
            size_of::<GntallocAllocGref>() as u64,
        ),
        (
            "offsetof(struct ioctl_gntalloc_alloc_gref, flags)",
            offset_of!(GntallocAllocGref, flags) as u64,
        ),
        (
            "offsetof(struct ioctl_gntalloc_alloc_gref, count)",
            offset_of!(GntallocAllocGref, count) as u64,
        ),
        (
            "offsetof(struct ioctl_gntalloc_alloc_gref, index)",
            offset_of!(GntallocAllocGref, index) as u64,
        ),
        (
            "offsetof(struct ioctl_gntalloc_alloc_gref, gref_ids)",
            offset_of!(GntallocAllocGref, gref_ids) as u64,
        ),
        (
            "sizeof(struct ioctl_gntdev_map_grant_ref)",
            size_of::<GntdevMapGrantRef>() as u64,
        ),
        (
            "offsetof(struct ioctl_gntdev_map_grant_ref, index)",
            offset_of!(GntdevMapGrantRef, index) as u64,
        ),
        (
            "offsetof(struct ioctl_gntdev_map_grant_ref, refs)",
            offset_of!(GntdevMapGrantRef, refs) as u64,
        ),
        (
            "sizeof(struct ioctl_gntdev_grant_ref)",
            size_of::<GntdevGrantRef>() as u64,
        ),
        (
            "offsetof(struct ioctl_gntalloc_unmap_notify, action)",
            offset_of!(UnmapNotify, action) as u64,
        ),
        (
            "offsetof(struct ioctl_gntalloc_unmap_notify, event_channel_port)",
            offset_of!(UnmapNotify, event_channel_port) as u64,
        ),
        ("GNTALLOC_FLAG_WRITABLE", GNTALLOC_FLAG_WRITABLE.into()),
        ("UNMAP_NOTIFY_CLEAR_BYTE", UNMAP_NOTIFY_CLEAR_BYTE.into()),
        ("UNMAP_NOTIFY_SEND_EVENT", UNMAP_NOTIFY_SEND_EVENT.into()),
    ];
    assert_eq!(
        c.len(),
        rust.len(),
        "every value the C side prints is compared"
    );
    for (name, v) in rust {
        assert_eq!(
            c.get(name),
            Some(&v),
            "{name}: header says {:?}, Rust has {v}",
            c.get(name)
        );
    }
}
