//! Run-time compiled CUDA kernels launched on tch tensors: NVRTC compiles CUDA C source for the current
//! GPU (no CUDA toolkit at build time; libnvrtc and the driver are opened at run time, from the pip
//! wheels torch installs), and launches go to libtorch's current stream, so they order with tch's own
//! kernels and are recorded into a [`crate::CudaGraph`] being captured.
//!
//! ```no_run
//! # fn main() -> Result<(), cuda_graph::Error> {
//! use cuda_graph::jit::{Arg, Module};
//! use tch::{Device, Kind, Tensor};
//! let m = Module::compile(Device::Cuda(0), "scale.cu",
//!     r#"extern "C" __global__ void scale(float* x, float s, int n) {
//!            int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] *= s; }"#)?;
//! let f = m.function("scale")?;
//! let x = Tensor::ones([1000], (Kind::Float, Device::Cuda(0)));
//! // SAFETY: `x` holds 1000 f32 and the kernel touches indices < 1000 only.
//! unsafe { f.launch([4, 1, 1], [256, 1, 1], 0, &[Arg::Tensor(&x), Arg::F32(2.0), Arg::I32(1000)])? };
//! # Ok(()) }
//! ```
//!
//! A crate keeps its kernels in a `static` [`Kernels`] (compiled on first use, the outcome kept for the
//! process); [`Function::launch_dependent`] launches a kernel that may overlap its predecessor
//! (programmatic dependent launch), and [`check_compiles`] checks a source on machines without a GPU.

use std::ffi::{c_char, c_void, CString};

use tch::{Device, Tensor};

use crate::Error;

#[cfg(cuda_graph)]
mod ffi {
    use std::ffi::{c_char, c_int, c_uint, c_void};
    extern "C" {
        pub fn amoe_jit_compile(source: *const c_char, name: *const c_char, device: c_int, module: *mut *mut c_void) -> *mut c_char;
        pub fn amoe_jit_function(module: *mut c_void, name: *const c_char, function: *mut *mut c_void) -> *mut c_char;
        pub fn amoe_jit_launch(
            function: *mut c_void,
            device: c_int,
            grid: *const c_uint,
            block: *const c_uint,
            shared: c_uint,
            args: *mut *mut c_void,
            programmatic: c_int,
        ) -> *mut c_char;
        pub fn amoe_jit_check(source: *const c_char, name: *const c_char, arch: *const c_char) -> *mut c_char;
        pub fn amoe_jit_free_error(e: *mut c_char);
    }
}

#[cfg(cuda_graph)]
fn check(op: &'static str, err: *mut c_char) -> Result<(), Error> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string malloc'd by the shim, freed once here.
    let msg = unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned();
    unsafe { ffi::amoe_jit_free_error(err) };
    Err(Error::Torch { op, msg })
}

fn cstring(op: &'static str, s: &str) -> Result<CString, Error> {
    CString::new(s).map_err(|_| Error::Torch { op, msg: "string contains a NUL byte".into() })
}

/// Compiled and loaded CUDA code (lives for the process: modules are never unloaded).
#[derive(Debug)]
pub struct Module {
    raw: *mut c_void,
    device: i32,
}

/// One kernel of a [`Module`].
#[derive(Debug, Clone, Copy)]
pub struct Function {
    raw: *mut c_void,
    device: i32,
}

// SAFETY: CUDA module and function handles are plain driver handles, valid from any thread of the process
// once loaded; launches are serialised by the stream, not by the handle.
unsafe impl Send for Module {}
unsafe impl Sync for Module {}
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

/// A kernel argument.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    /// A CUDA tensor, passed as its data pointer.
    Tensor(&'a Tensor),
    /// `int`.
    I32(i32),
    /// `long long`.
    I64(i64),
    /// `float`.
    F32(f32),
    /// `double`.
    F64(f64),
}

/// Compile `source` with NVRTC for `arch` (e.g. `sm_90`) without loading it: needs NVRTC but no GPU or
/// driver, so CPU-only machines (CI) can check that kernels compile. Errors carry NVRTC's log.
pub fn check_compiles(name: &str, source: &str, arch: &str) -> Result<(), Error> {
    let (src, label, arch) = (cstring("jit check", source)?, cstring("jit check", name)?, cstring("jit check", arch)?);
    #[cfg(cuda_graph)]
    {
        // SAFETY: the three strings are NUL-terminated and outlive the call.
        check("jit check", unsafe { ffi::amoe_jit_check(src.as_ptr(), label.as_ptr(), arch.as_ptr()) })
    }
    #[cfg(not(cuda_graph))]
    {
        let _ = (src, label, arch);
        Err(Error::NotCompiled)
    }
}

impl Module {
    /// Compile `source` (CUDA C; kernels `extern "C"` so their names are not mangled) with NVRTC for
    /// `device`'s architecture and load it. `name` labels it in error messages.
    pub fn compile(device: Device, name: &str, source: &str) -> Result<Self, Error> {
        let Device::Cuda(index) = device else {
            return Err(Error::NotCuda(device));
        };
        let (src, label) = (cstring("jit compile", source)?, cstring("jit compile", name)?);
        #[cfg(cuda_graph)]
        {
            let mut raw = std::ptr::null_mut();
            // SAFETY: both strings are NUL-terminated and outlive the call; `raw` is an out-pointer.
            check("jit compile", unsafe { ffi::amoe_jit_compile(src.as_ptr(), label.as_ptr(), index as i32, &mut raw) })?;
            Ok(Self { raw, device: index as i32 })
        }
        #[cfg(not(cuda_graph))]
        {
            let _ = (src, label, index);
            Err(Error::NotCompiled)
        }
    }

    /// The kernel called `name`.
    pub fn function(&self, name: &str) -> Result<Function, Error> {
        let name = cstring("jit function", name)?;
        #[cfg(cuda_graph)]
        {
            let mut raw = std::ptr::null_mut();
            // SAFETY: `self.raw` is a loaded module; `name` is NUL-terminated; `raw` is an out-pointer.
            check("jit function", unsafe { ffi::amoe_jit_function(self.raw, name.as_ptr(), &mut raw) })?;
            Ok(Function { raw, device: self.device })
        }
        #[cfg(not(cuda_graph))]
        {
            let _ = name;
            Err(Error::NotCompiled)
        }
    }
}

/// A CUDA source compiled once per process, on first use, with its kernels looked up by name: what a
/// crate keeps in a `static` for its run-time compiled kernels. The first call's outcome is kept: the
/// module is built for the device of that call, and a failure (no NVRTC, no driver, a compile error) is
/// returned to every later call, so callers fall back to their libtorch paths without retrying.
pub struct Kernels {
    file: &'static str,
    source: &'static str,
    names: &'static [&'static str],
    cell: std::sync::OnceLock<Result<(Vec<Function>, Module), String>>,
}

impl Kernels {
    /// `source` (labelled `file` in messages) with the kernels `names`, compiled on the first [`Kernels::get`].
    pub const fn new(file: &'static str, source: &'static str, names: &'static [&'static str]) -> Self {
        Self { file, source, names, cell: std::sync::OnceLock::new() }
    }

    /// The kernels in `names` order, compiled and loaded for `device` on the first call; or the first
    /// call's error message. `first_failure` sees that error once per process (to log it).
    pub fn get(&self, device: Device, first_failure: impl FnOnce(&Error)) -> Result<&[Function], &str> {
        let built = self.cell.get_or_init(|| {
            let built = Module::compile(device, self.file, self.source).and_then(|module| {
                let functions = self.names.iter().map(|n| module.function(n)).collect::<Result<Vec<_>, _>>()?;
                Ok((functions, module))
            });
            built.map_err(|e| {
                first_failure(&e);
                format!("{}: {e}", self.file)
            })
        });
        match built {
            Ok((functions, _)) => Ok(functions.as_slice()),
            Err(msg) => Err(msg.as_str()),
        }
    }

    /// The file name the source is labelled with.
    pub fn file(&self) -> &'static str {
        self.file
    }

    /// The CUDA source, as NVRTC gets it (for [`check_compiles`]).
    pub fn source(&self) -> &'static str {
        self.source
    }
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels").field("file", &self.file).field("names", &self.names).field("compiled", &self.cell.get().map(|r| r.is_ok())).finish()
    }
}

impl Function {
    /// Launch on libtorch's current stream with `grid` blocks of `block` threads and `shared` bytes of
    /// dynamic shared memory. Tensors must be on this function's device.
    ///
    /// # Safety
    /// The kernel trusts its arguments: the caller guarantees that their number and types match the
    /// kernel's parameters and that every index the kernel computes from them stays inside the tensors
    /// (which must stay alive until the kernel has run, as libtorch's caching allocator ensures for
    /// tensors used on the same stream).
    pub unsafe fn launch(&self, grid: [u32; 3], block: [u32; 3], shared: u32, args: &[Arg<'_>]) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { self.launch_with(grid, block, shared, args, false) }
    }

    /// [`Function::launch`] as a programmatic dependent launch (sm_90 and later): the kernel's blocks may
    /// start while the stream's previous kernel is still running, so a kernel can read its weights
    /// while its predecessor finishes. On older drivers it is an ordinary launch. It is captured into
    /// CUDA graphs like any launch.
    ///
    /// # Safety
    /// As [`Function::launch`], and the kernel executes `griddepcontrol.wait` (which waits for the
    /// previous kernel to finish and its writes to be visible) before it reads or writes any memory
    /// that earlier work on the stream writes or reads; before it, only immutable inputs (weights).
    pub unsafe fn launch_dependent(&self, grid: [u32; 3], block: [u32; 3], shared: u32, args: &[Arg<'_>]) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { self.launch_with(grid, block, shared, args, true) }
    }

    unsafe fn launch_with(&self, grid: [u32; 3], block: [u32; 3], shared: u32, args: &[Arg<'_>], programmatic: bool) -> Result<(), Error> {
        // Each argument's value, stored where the driver can read it through a pointer.
        let mut values: Vec<u64> = Vec::with_capacity(args.len());
        for a in args {
            values.push(match *a {
                Arg::Tensor(t) => {
                    if t.device() != Device::Cuda(self.device as usize) {
                        return Err(Error::Torch { op: "jit launch", msg: format!("tensor on {:?}, kernel on cuda:{}", t.device(), self.device) });
                    }
                    t.data_ptr() as u64
                }
                Arg::I32(v) => v as u32 as u64,
                Arg::I64(v) => v as u64,
                Arg::F32(v) => v.to_bits() as u64,
                Arg::F64(v) => v.to_bits(),
            });
        }
        // The driver reads sizeof(param) bytes at each pointer: 8 for pointers, long long and double, 4 for int and float,
        // which are the low bytes of the u64 on a little-endian machine.
        let mut ptrs: Vec<*mut c_void> = values.iter_mut().map(|v| v as *mut u64 as *mut c_void).collect();
        #[cfg(cuda_graph)]
        {
            // SAFETY: the caller upholds the kernel's contract; `ptrs` outlives the call.
            check("jit launch", unsafe {
                ffi::amoe_jit_launch(self.raw, self.device, grid.as_ptr(), block.as_ptr(), shared, ptrs.as_mut_ptr(), std::ffi::c_int::from(programmatic))
            })
        }
        #[cfg(not(cuda_graph))]
        {
            let _ = (grid, block, shared, &mut ptrs, programmatic);
            Err(Error::NotCompiled)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC alone (no GPU): good source compiles, bad source is an error that carries NVRTC's log.
    #[test]
    fn sources_are_checked_without_a_gpu() {
        let good = r#"extern "C" __global__ void k(float* x) { x[threadIdx.x] = 1.f; }"#;
        match check_compiles("good.cu", good, "sm_90") {
            Err(Error::NotCompiled) => return eprintln!("shim not compiled in: nothing to check"),
            r => r.expect("valid CUDA compiles"),
        }
        let err = check_compiles("bad.cu", "extern \"C\" __global__ void k() { undefined_name; }", "sm_90").expect_err("bad source");
        assert!(err.to_string().contains("undefined_name"), "{err}");
    }

    #[test]
    fn compiling_for_the_cpu_is_refused() {
        let e = Module::compile(Device::Cpu, "x.cu", "").expect_err("cpu");
        assert!(e.to_string().contains("CUDA device"), "{e}");
    }

    /// On a GPU: a kernel compiled at run time scales a tensor in place, also inside a captured graph.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn a_jit_kernel_runs_eagerly_and_in_a_graph() {
        use tch::Kind;
        let _one = crate::tests::GPU.lock().unwrap_or_else(|e| e.into_inner());
        let dev = Device::Cuda(0);
        let m = Module::compile(
            dev,
            "scale.cu",
            r#"extern "C" __global__ void scale(float* x, float s, int n) {
                   int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] *= s; }"#,
        )
        .expect("compile");
        let f = m.function("scale").expect("function");
        let x = Tensor::ones([1000], (Kind::Float, dev));
        // SAFETY: x holds 1000 floats; the kernel writes indices < 1000.
        unsafe { f.launch([4, 1, 1], [256, 1, 1], 0, &[Arg::Tensor(&x), Arg::F32(3.0), Arg::I32(1000)]) }.expect("launch");
        tch::Cuda::synchronize(0);
        assert_eq!(x.sum(Kind::Float).double_value(&[]), 3000.0);
        let mut g = crate::CudaGraph::new(dev).expect("graph");
        g.capture(|| unsafe { f.launch([4, 1, 1], [256, 1, 1], 0, &[Arg::Tensor(&x), Arg::F32(2.0), Arg::I32(1000)]) })
            .expect("capture")
            .expect("launch in capture");
        tch::Cuda::synchronize(0);
        assert_eq!(x.sum(Kind::Float).double_value(&[]), 3000.0, "capture must not run the kernel");
        g.replay().expect("replay");
        g.replay().expect("replay");
        tch::Cuda::synchronize(0);
        assert_eq!(x.sum(Kind::Float).double_value(&[]), 12000.0);
    }
}
