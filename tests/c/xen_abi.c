/* Prints the Linux uapi Xen ioctl numbers and layouts that transport::vchan::xen::abi mirrors
 * (compiled and compared by tests/tests/transport_xen_abi.rs). GPL-3.0-only, part of ddstor. */
#include <stdio.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <stdint.h>
typedef uint16_t domid_t;
typedef uint32_t grant_ref_t;
#include <xen/evtchn.h>
#include <xen/gntalloc.h>
#include <xen/gntdev.h>
#define P(x) printf(#x "=%llu\n", (unsigned long long)(x))
int main(void) {
  P(IOCTL_GNTALLOC_ALLOC_GREF); P(IOCTL_GNTALLOC_DEALLOC_GREF); P(IOCTL_GNTALLOC_SET_UNMAP_NOTIFY);
  P(IOCTL_GNTDEV_MAP_GRANT_REF); P(IOCTL_GNTDEV_UNMAP_GRANT_REF); P(IOCTL_GNTDEV_SET_UNMAP_NOTIFY);
  P(IOCTL_EVTCHN_BIND_INTERDOMAIN); P(IOCTL_EVTCHN_BIND_UNBOUND_PORT); P(IOCTL_EVTCHN_UNBIND); P(IOCTL_EVTCHN_NOTIFY);
  P(sizeof(struct ioctl_gntalloc_alloc_gref)); P(offsetof(struct ioctl_gntalloc_alloc_gref, flags));
  P(offsetof(struct ioctl_gntalloc_alloc_gref, count)); P(offsetof(struct ioctl_gntalloc_alloc_gref, index));
  P(offsetof(struct ioctl_gntalloc_alloc_gref, gref_ids));
  P(sizeof(struct ioctl_gntdev_map_grant_ref)); P(offsetof(struct ioctl_gntdev_map_grant_ref, index));
  P(offsetof(struct ioctl_gntdev_map_grant_ref, refs)); P(sizeof(struct ioctl_gntdev_grant_ref));
  P(offsetof(struct ioctl_gntalloc_unmap_notify, action)); P(offsetof(struct ioctl_gntalloc_unmap_notify, event_channel_port));
  P(GNTALLOC_FLAG_WRITABLE); P(UNMAP_NOTIFY_CLEAR_BYTE); P(UNMAP_NOTIFY_SEND_EVENT);
  return 0;
}
