//! OS-noise measurement for ffmk-vmm (see "Noise and FWQ" in the design
//! brief): [`sample`] runs FWQ/FTQ on host or guest CPUs (the same loop the
//! probe guest runs in ring 3), [`input`] reads sample sets from files and
//! probe logs, [`stats`] summarises them, [`plot`] draws them.
pub mod input;
#[cfg(feature = "plot")]
pub mod plot;
pub mod sample;
pub mod stats;
