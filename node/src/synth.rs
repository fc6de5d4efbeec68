//! synth (to be written)
