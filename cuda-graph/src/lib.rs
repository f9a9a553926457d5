//! CUDA graphs for tch: capture a sequence of libtorch operations once and replay it with one launch;
//! and ([`jit`]) CUDA kernels compiled at run time and launched on tch tensors.
//!
//! tch has no binding for `torch.cuda.CUDAGraph`; this crate reaches libtorch's `at::cuda::CUDAGraph`
//! through a small C++ shim (`csrc/graph.cpp`) that the build script compiles against the same libtorch
//! headers tch uses. Without CUDA libraries or headers at build time the crate still builds, and
//! [`CudaGraph::new`] returns [`Error::NotCompiled`].
//!
//! The protocol is PyTorch's (`torch.cuda.graph`):
//! 1. [`CudaGraph::warm_up`] runs the work eagerly on the graph's side stream (lazy initialisation of
//!    cuBLAS workspaces and the like must happen outside capture);
//! 2. [`CudaGraph::capture`] runs it once more while recording: no kernel runs, and every tensor the work
//!    allocates comes from a memory pool private to the graph, so the tensors it returns are the graph's
//!    *static* outputs, rewritten in place by every replay;
//! 3. [`CudaGraph::replay`] relaunches the recorded kernels on the current stream.
//!
//! Rules the captured work must follow (libtorch enforces the first by failing the capture): no host
//! synchronisation (`item`, `nonzero`, copies to the host), fixed shapes, and inputs read from and state
//! written to tensors that outlive the graph (copy new inputs into them before each replay).
//!
//! ```no_run
//! # fn main() -> Result<(), cuda_graph::Error> {
//! use tch::{Device, Kind, Tensor};
//! let dev = Device::Cuda(0);
//! let mut x = Tensor::zeros([4], (Kind::Float, dev)); // a static input
//! let mut g = cuda_graph::CudaGraph::new(dev)?;
//! g.warm_up(|| &x * 2.0)?;
//! let y = g.capture(|| &x * 2.0)?; // a static output
//! x.copy_(&Tensor::ones([4], (Kind::Float, dev)));
//! g.replay()?;
//! assert_eq!(Vec::<f32>::try_from(&y).unwrap(), vec![2.0; 4]);
//! # Ok(()) }
//! ```
#![allow(unsafe_code)] // the FFI to the C++ shim; each call site states its invariant

use std::ffi::{c_char, c_void, CStr};

use tch::Device;

pub mod jit;

/// Why a graph could not be made, captured or replayed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The crate was built without the C++ shim (no CUDA libtorch or no CUDA headers at build time).
    #[error("CUDA graphs are not compiled into this build (libtorch without CUDA, or no CUDA headers at build time)")]
    NotCompiled,
    /// Graphs need a CUDA device.
    #[error("CUDA graphs need a CUDA device, not {0:?}")]
    NotCuda(Device),
    /// [`CudaGraph::replay`] before a successful [`CudaGraph::capture`].
    #[error("the graph has not been captured")]
    NotCaptured,
    /// libtorch raised an error in `op` (for instance an operation that synchronises with the host
    /// during capture).
    #[error("CUDA graph {op}: {msg}")]
    Torch {
        /// The shim function.
        op: &'static str,
        /// libtorch's message.
        msg: String,
    },
}

/// A CUDA graph bound to one device, with its own capture stream and memory pool.
#[derive(Debug)]
pub struct CudaGraph {
    raw: *mut c_void,
    captured: bool,
}

#[cfg(cuda_graph)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};
    extern "C" {
        pub fn amoe_graph_new(device: c_int, out: *mut *mut c_void) -> *mut c_char;
        pub fn amoe_graph_delete(g: *mut c_void);
        pub fn amoe_graph_enter_side_stream(g: *mut c_void) -> *mut c_char;
        pub fn amoe_graph_leave_side_stream(g: *mut c_void) -> *mut c_char;
        pub fn amoe_graph_capture_begin(g: *mut c_void) -> *mut c_char;
        pub fn amoe_graph_capture_end(g: *mut c_void) -> *mut c_char;
        pub fn amoe_graph_replay(g: *mut c_void) -> *mut c_char;
        pub fn amoe_graph_free_error(e: *mut c_char);
    }
}

/// Turn a shim return value (NULL or a malloc'd message) into a result.
#[cfg(cuda_graph)]
fn check(op: &'static str, err: *mut c_char) -> Result<(), Error> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string from the shim's `message`, freed once here.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    unsafe { ffi::amoe_graph_free_error(err) };
    Err(Error::Torch { op, msg })
}

#[cfg(not(cuda_graph))]
#[allow(dead_code)]
fn check(_op: &'static str, _err: *mut c_char) -> Result<(), Error> {
    let _ = CStr::from_bytes_with_nul(b"\0");
    Err(Error::NotCompiled)
}

/// Whether this build contains the C++ shim (a GPU is still needed to use it).
pub fn compiled() -> bool {
    cfg!(cuda_graph)
}

/// Leaves the side stream (and ends a capture in progress) when dropped, so an early return or a panic in
/// the captured closure never leaves the thread capturing.
#[cfg(cuda_graph)]
struct SideStream<'a> {
    raw: *mut c_void,
    capturing: bool,
    _graph: std::marker::PhantomData<&'a mut CudaGraph>,
}

#[cfg(cuda_graph)]
impl SideStream<'_> {
    fn enter(graph: &mut CudaGraph) -> Result<SideStream<'_>, Error> {
        // SAFETY: `raw` is a live graph made by `amoe_graph_new` (dropped only with `graph`).
        check("enter side stream", unsafe { ffi::amoe_graph_enter_side_stream(graph.raw) })?;
        Ok(SideStream { raw: graph.raw, capturing: false, _graph: std::marker::PhantomData })
    }

    fn begin_capture(&mut self) -> Result<(), Error> {
        // SAFETY: as in `enter`; we are on the side stream.
        check("capture_begin", unsafe { ffi::amoe_graph_capture_begin(self.raw) })?;
        self.capturing = true;
        Ok(())
    }

    fn end_capture(&mut self) -> Result<(), Error> {
        self.capturing = false;
        // SAFETY: as in `enter`; a capture is in progress.
        check("capture_end", unsafe { ffi::amoe_graph_capture_end(self.raw) })
    }

    fn leave(mut self) -> Result<(), Error> {
        let r = if self.capturing { self.end_capture() } else { Ok(()) };
        let raw = self.raw;
        std::mem::forget(self);
        // SAFETY: as in `enter`; we are on the side stream.
        let left = check("leave side stream", unsafe { ffi::amoe_graph_leave_side_stream(raw) });
        r.and(left)
    }
}

#[cfg(cuda_graph)]
impl Drop for SideStream<'_> {
    fn drop(&mut self) {
        // SAFETY: as in `enter`; errors are dropped because this only runs while unwinding.
        unsafe {
            if self.capturing {
                let e = ffi::amoe_graph_capture_end(self.raw);
                if !e.is_null() {
                    ffi::amoe_graph_free_error(e);
                }
            }
            let e = ffi::amoe_graph_leave_side_stream(self.raw);
            if !e.is_null() {
                ffi::amoe_graph_free_error(e);
            }
        }
    }
}

impl CudaGraph {
    /// An empty graph on `device` (a CUDA device).
    pub fn new(device: Device) -> Result<Self, Error> {
        let Device::Cuda(index) = device else {
            return Err(Error::NotCuda(device));
        };
        #[cfg(cuda_graph)]
        {
            let mut raw = std::ptr::null_mut();
            // SAFETY: `raw` is a valid out-pointer; the shim sets it only on success.
            check("new", unsafe { ffi::amoe_graph_new(index as i32, &mut raw) })?;
            Ok(Self { raw, captured: false })
        }
        #[cfg(not(cuda_graph))]
        {
            let _ = index;
            Err(Error::NotCompiled)
        }
    }

    /// Run `f` eagerly on the graph's stream (warm-up before [`CudaGraph::capture`]).
    pub fn warm_up<T>(&mut self, f: impl FnOnce() -> T) -> Result<T, Error> {
        #[cfg(cuda_graph)]
        {
            let side = SideStream::enter(self)?;
            let out = f();
            side.leave()?;
            Ok(out)
        }
        #[cfg(not(cuda_graph))]
        {
            let _ = f;
            Err(Error::NotCompiled)
        }
    }

    /// Record the CUDA work of `f` into the graph (replacing nothing: capture once per graph) and return
    /// what `f` returned: tensors made inside are the graph's static outputs. If `f` reports its own
    /// failure inside `T`, the caller must not replay. Fails if libtorch rejects the capture (a host
    /// synchronisation inside `f`, for instance).
    pub fn capture<T>(&mut self, f: impl FnOnce() -> T) -> Result<T, Error> {
        #[cfg(cuda_graph)]
        {
            if self.captured {
                return Err(Error::Torch { op: "capture", msg: "this graph is already captured".into() });
            }
            let mut side = SideStream::enter(self)?;
            side.begin_capture()?;
            let out = f();
            side.end_capture()?;
            side.leave()?;
            self.captured = true;
            Ok(out)
        }
        #[cfg(not(cuda_graph))]
        {
            let _ = f;
            Err(Error::NotCompiled)
        }
    }

    /// Launch the recorded work on the current stream (asynchronous, like any CUDA launch).
    pub fn replay(&self) -> Result<(), Error> {
        if !self.captured {
            return Err(Error::NotCaptured);
        }
        #[cfg(cuda_graph)]
        {
            // SAFETY: `raw` is a live, captured graph.
            check("replay", unsafe { ffi::amoe_graph_replay(self.raw) })
        }
        #[cfg(not(cuda_graph))]
        {
            Err(Error::NotCompiled)
        }
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        #[cfg(cuda_graph)]
        // SAFETY: `raw` came from `amoe_graph_new` and is dropped exactly once, here.
        unsafe {
            ffi::amoe_graph_delete(self.raw)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_devices_are_refused_with_a_clear_error() {
        let e = CudaGraph::new(Device::Cpu).expect_err("cpu");
        assert!(e.to_string().contains("CUDA device"), "{e}");
    }

    #[test]
    fn the_shim_is_compiled_when_libtorch_has_cuda() {
        // The workspace's venv ships CUDA libtorch and the CUDA runtime headers (pip wheels), so every
        // build of this repository, CI included, should contain the shim.
        let libtorch = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../libtorch/lib/libtorch_cuda.so");
        if libtorch.exists() {
            assert!(compiled());
        }
    }

    /// The GPU tests (here and in `jit`) run one at a time: a device-wide synchronisation in one test would fail while
    /// another test's stream is capturing.
    pub(crate) static GPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// On a GPU: capture `y = x * 2 + 1`, change `x`, replay, read `y`.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn replay_recomputes_static_outputs_from_static_inputs() {
        use tch::{Kind, Tensor};
        let _one = GPU.lock().unwrap_or_else(|e| e.into_inner());
        let dev = Device::Cuda(0);
        let mut x = Tensor::zeros([8], (Kind::Float, dev));
        let mut g = CudaGraph::new(dev).expect("graph");
        let _ = g.warm_up(|| &x * 2.0 + 1.0).expect("warm up");
        let y = g.capture(|| &x * 2.0 + 1.0).expect("capture");
        for v in [1.0f64, 5.0] {
            let _ = x.fill_(v);
            g.replay().expect("replay");
            tch::Cuda::synchronize(0);
            assert_eq!(Vec::<f32>::try_from(&y).expect("read"), vec![(2.0 * v + 1.0) as f32; 8]);
        }
    }

    /// On a GPU: a host synchronisation inside capture is an error, not a crash, and the thread is back
    /// on its stream afterwards.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn a_host_sync_during_capture_is_reported() {
        use tch::{Kind, Tensor};
        let _one = GPU.lock().unwrap_or_else(|e| e.into_inner());
        let dev = Device::Cuda(0);
        let x = Tensor::ones([8], (Kind::Float, dev));
        let mut g = CudaGraph::new(dev).expect("graph");
        let r = g.capture(|| x.f_sum(Kind::Float).and_then(|s| s.f_to_device(Device::Cpu)));
        assert!(r.is_err() || r.as_ref().is_ok_and(|inner| inner.is_err()), "capture with a host copy must fail");
        let z = (&x * 3.0).sum(Kind::Float).double_value(&[]);
        assert_eq!(z, 24.0);
    }
}
