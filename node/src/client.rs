//! client (to be written)
