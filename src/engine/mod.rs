//! The pure core: session windows, watermarks and source-position completion.
//!
//! Nothing here does I/O, reads a clock or awaits: event time arrives with the
//! events, wall-clock time arrives as an argument (`now_ms`), and the async
//! shells in the broker folders decide when to call. That keeps every rule of
//! `docs/semantics.md` testable with explicit time.

mod completion;
mod session;
mod watermark;

pub use completion::CompletionTracker;
pub use session::{
    ClosedSession, DropReason, LatePolicy, Resolution, SessionEngine, SessionMessage, WindowConfig,
};
pub use watermark::{IdleClock, IdlePolicy, WatermarkTracker};
