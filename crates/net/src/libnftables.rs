//! libnftables in-process, loaded at run time with `libloading`: rules are applied without
//! forking `nft`, and a host without the library still works (through the binary, see
//! `nft::run`).
//!
//! The library is opened once and never unloaded; its entry points are typed [`Symbol`]s that
//! borrow it, and a [`Context`] borrows those, so no context can outlive the code it runs.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};

use libloading::{Library, Symbol};

/// The soname the library is looked up by (`libnftables(3)`).
const SONAME: &str = "libnftables.so.1";
/// `NFT_CTX_OUTPUT_JSON`: answers (`list …`) in JSON.
const OUTPUT_JSON: c_uint = 1 << 4;

type Ctx = *mut c_void;

/// The entry points of `libnftables(3)` the runner uses, with their C signatures.
pub struct Api<'lib> {
    new: Symbol<'lib, unsafe extern "C" fn(c_uint) -> Ctx>,
    free: Symbol<'lib, unsafe extern "C" fn(Ctx)>,
    set_output_flags: Symbol<'lib, unsafe extern "C" fn(Ctx, c_uint)>,
    buffer_output: Symbol<'lib, unsafe extern "C" fn(Ctx) -> c_int>,
    buffer_error: Symbol<'lib, unsafe extern "C" fn(Ctx) -> c_int>,
    get_output: Symbol<'lib, unsafe extern "C" fn(Ctx) -> *const c_char>,
    get_error: Symbol<'lib, unsafe extern "C" fn(Ctx) -> *const c_char>,
    run: Symbol<'lib, unsafe extern "C" fn(Ctx, *const c_char) -> c_int>,
}

impl<'lib> Api<'lib> {
    fn resolve(lib: &'lib Library) -> Result<Self, libloading::Error> {
        // SAFETY: each type is the symbol's prototype in libnftables(3) (`nft_ctx_new`,
        // `nft_ctx_free`, `nft_ctx_output_set_flags`, `nft_ctx_buffer_output`,
        // `nft_ctx_buffer_error`, `nft_ctx_get_output_buffer`, `nft_ctx_get_error_buffer`,
        // `nft_run_cmd_from_buffer`), and the symbols borrow `lib`, so they cannot outlive it.
        unsafe {
            Ok(Api {
                new: lib.get(b"nft_ctx_new\0")?,
                free: lib.get(b"nft_ctx_free\0")?,
                set_output_flags: lib.get(b"nft_ctx_output_set_flags\0")?,
                buffer_output: lib.get(b"nft_ctx_buffer_output\0")?,
                buffer_error: lib.get(b"nft_ctx_buffer_error\0")?,
                get_output: lib.get(b"nft_ctx_get_output_buffer\0")?,
                get_error: lib.get(b"nft_ctx_get_error_buffer\0")?,
                run: lib.get(b"nft_run_cmd_from_buffer\0")?,
            })
        }
    }
}

/// The library, opened on first use; `None` if the host does not have it.
fn library() -> Option<&'static Library> {
    static LIBRARY: OnceLock<Option<Library>> = OnceLock::new();
    LIBRARY
        .get_or_init(|| {
            let flags = libc::RTLD_NOW | libc::RTLD_LOCAL;
            // SAFETY: libnftables has no initialisers with preconditions, and it is never
            // unloaded (it lives in this static for the life of the process).
            let lib = unsafe { libloading::os::unix::Library::open(Some(SONAME), flags) };
            lib.map_err(|e| tracing::debug!(error = %e, "libnftables not loaded; using nft"))
                .ok()
                .map(Library::from)
        })
        .as_ref()
}

/// libnftables' entry points, if the library loads and has them all.
pub fn api() -> Option<&'static Api<'static>> {
    static API: OnceLock<Option<Api<'static>>> = OnceLock::new();
    API.get_or_init(|| {
        Api::resolve(library()?)
            .map_err(|e| tracing::warn!(error = %e, "libnftables lacks a symbol; using nft"))
            .ok()
    })
    .as_ref()
}

/// One `nft_ctx`: JSON output, output and errors buffered. Freed on drop.
struct Context<'a> {
    api: &'a Api<'a>,
    ctx: NonNull<c_void>,
}

impl<'a> Context<'a> {
    fn new(api: &'a Api<'a>) -> Option<Self> {
        // SAFETY: `nft_ctx_new(0)` makes a context with default flags, or returns NULL.
        let ctx = NonNull::new(unsafe { (api.new)(0) })?;
        let c = Context { api, ctx };
        // SAFETY: `ctx` is a live context, used only on this thread; these calls only set its
        // output flags and make it collect output and errors in buffers it owns.
        unsafe {
            (api.set_output_flags)(c.ctx.as_ptr(), OUTPUT_JSON);
            (api.buffer_output)(c.ctx.as_ptr());
            (api.buffer_error)(c.ctx.as_ptr());
        }
        Some(c)
    }

    /// Runs `cmd`; the buffered output if it succeeds, the buffered errors if not.
    fn run(&self, cmd: &CStr) -> Result<String, String> {
        // SAFETY: `ctx` is live and `cmd` a NUL-terminated string that outlives the call.
        let rc = unsafe { (self.api.run)(self.ctx.as_ptr(), cmd.as_ptr()) };
        let out = self.buffer(&self.api.get_output);
        let err = self.buffer(&self.api.get_error);
        if rc == 0 {
            Ok(out)
        } else {
            Err(err)
        }
    }

    /// A copy of one of the context's buffers.
    fn buffer(&self, get: &Symbol<'_, unsafe extern "C" fn(Ctx) -> *const c_char>) -> String {
        // SAFETY: with buffering on, the getter returns a NUL-terminated string owned by `ctx`
        // (or NULL), valid until the next call on `ctx`; it is copied before any such call.
        unsafe {
            let p = get(self.ctx.as_ptr());
            if p.is_null() {
                return String::new();
            }
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from `nft_ctx_new`, is freed once, and nothing borrowed from it
        // (buffers are copied out) outlives this.
        unsafe { (self.api.free)(self.ctx.as_ptr()) }
    }
}

impl Api<'_> {
    /// Runs one command buffer (JSON or text) in the calling thread's network namespace: its
    /// output if it succeeds, the library's error text (trimmed) if not.
    pub fn run(&self, cmd: &str) -> Result<String, String> {
        let cmd = CString::new(cmd).map_err(|_| "NUL in command".to_string())?;
        // libnftables keeps some process-global state; one call at a time.
        static LOCK: Mutex<()> = Mutex::new(());
        let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let ctx = Context::new(self).ok_or_else(|| "nft_ctx_new failed".to_string())?;
        ctx.run(&cmd).map_err(|e| e.trim().to_string())
    }
}
