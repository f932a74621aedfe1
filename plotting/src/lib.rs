//! What the PNG plots of ffmk-vmm's tools share (the noise experiment's
//! `ffmk-fwq`, the balancing simulator's `ffmk-node balance-sim`): the font
//! plotters draws text with, registered once.
use plotters::style::FontStyle;

/// Where Debian's fonts-dejavu-core puts the font the plots use.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// The font could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("cannot load the plot font {FONT} (install Debian's fonts-dejavu-core): {0}")]
pub struct FontError(std::io::Error);

/// Why a plot was not drawn.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Font(#[from] FontError),
    #[error("cannot draw {path}: {msg}")]
    Draw { path: String, msg: String },
    #[error("nothing to plot")]
    Empty,
}

/// Registers [`FONT`] as plotters' "sans-serif" (idempotent).
pub fn register_font() -> Result<(), FontError> {
    static REGISTERED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if REGISTERED.get().is_some() {
        return Ok(());
    }
    let bytes = std::fs::read(FONT).map_err(FontError)?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| FontError(std::io::Error::other("not a TrueType font")))?;
    let _ = REGISTERED.set(());
    Ok(())
}
