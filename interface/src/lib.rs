//! The xapi storage interface served by ddstor: calls, records (`vdi_info`, `sr_info`, …) and
//! errors, with xapi's field names and defaults. Pure data: no I/O.
