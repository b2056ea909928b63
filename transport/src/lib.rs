//! Transport: length-prefixed bincode frames over any byte stream, unix sockets with peer
//! credential checks, and a libxenvchan-compatible vchan ring (Xen and simulated backends).
