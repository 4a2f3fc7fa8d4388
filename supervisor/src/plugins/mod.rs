//! Plugins as files: where they are and what they hold ([`files`]), the copy each
//! version runs from ([`versions`]), signatures ([`signing`]), dependencies
//! ([`deps`]), installs ([`install`]) and who may read them ([`access`]). Nothing
//! here knows about workers or the supervisor's tables.

pub mod access;
pub mod deps;
pub mod files;
pub mod install;
pub mod native;
pub mod signing;
pub mod vendor;
pub mod versions;
