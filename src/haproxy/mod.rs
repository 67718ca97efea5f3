//! Everything pgs says to HAProxy: rendered files, the Runtime API, the master CLI.

pub mod maps;
pub mod master;
pub mod render;
pub mod runtime;
