//! Every `unsafe` block and raw syscall of fledge lives here, each with a `// SAFETY:` comment.
//! The rest of the crate uses the safe wrappers below.
