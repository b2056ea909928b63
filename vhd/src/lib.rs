//! The VHD format engine: footers, dynamic headers, BATs, sector bitmaps, parent locators
//! and differencing chains, read and written with positional I/O.
