//! Unit tests of the supervisor against fakes (see fakes.rs).
