//! Placeholder replaced by the executor work.
