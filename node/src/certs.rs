//! certs (to be written)
