//! tls (to be written)
