//! A fake `libnvidia-ml.so.1`.
//!
//! Exports the NVML C symbols gpuscale's NVML source calls, with values and
//! errors read from a JSON file ([`config`]), so that tests exercise the real
//! `nvml-wrapper` code path (symbol loading, struct versions, error mapping)
//! on machines without a GPU. Not for: production, or any behaviour beyond
//! what the JSON file says (no timing, no real sampling).
//!
//! # Where the configuration comes from
//!
//! `$FAKE_NVML_CONFIG` when set, otherwise `fake-nvml.json` in the directory
//! the library was loaded from. Tests copy the built `libfake_nvml.so` into a
//! temporary directory as `libnvidia-ml.so.1` next to their own
//! `fake-nvml.json`: a copy is a different file, so the dynamic loader gives
//! each test its own instance with its own state, and tests running in
//! parallel threads do not share anything.
//!
//! The file is re-read whenever it changes (inode, size or modification time),
//! so a test can change what NVML reports mid-run (a GPU falls off the bus, a
//! Xid arrives) by writing a new file and renaming it over the old one.
//!
//! # Behaviour
//!
//! * Calls before `nvmlInit_v2` return `NVML_ERROR_UNINITIALIZED`; init and
//!   shutdown are reference counted and may be repeated.
//! * Without a configuration file `nvmlInit_v2` fails with
//!   `NVML_ERROR_DRIVER_NOT_LOADED` (and says why on stderr).
//! * Device handles, event sets and GPM samples are small integers disguised
//!   as pointers; nothing dereferences them.
//! * Xid events configured for a GPU are delivered once each (per version of
//!   the file) by `nvmlEventSetWait_v2`, which never blocks: with nothing
//!   pending it returns `NVML_ERROR_TIMEOUT` at once.
//! * Struct versions are checked as NVML does (`nvmlMemory_v2_t`,
//!   `nvmlGpmSupport_t`, `nvmlGpmMetricsGet_t`): a mismatch returns
//!   `NVML_ERROR_ARGUMENT_VERSION_MISMATCH`.
//!
//! # Safety
//!
//! Every exported function is `unsafe extern "C"`: the caller (NVML's
//! contract) passes output pointers that are null or valid for writes of the
//! pointed-to type, and string buffers valid for `length` bytes. Each `unsafe`
//! block below relies on exactly that and says so.

#![allow(non_snake_case)]

pub mod config;

use std::collections::{BTreeMap, VecDeque};
use std::ffi::{CStr, c_char, c_uint, c_ulonglong, c_void};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use nvml_wrapper_sys::bindings as sys;
use sys::{
    nvmlDevice_t, nvmlEventData_t, nvmlEventSet_t, nvmlGpmMetricsGet_t, nvmlGpmSample_t,
    nvmlGpmSupport_t, nvmlMemory_v2_t, nvmlPciInfo_t, nvmlProcessInfo_t, nvmlReturn_t,
    nvmlUtilization_t,
};

use config::{DeviceRef, DeviceView, FakeConfig, Reading, gpm_metric};

const SUCCESS: nvmlReturn_t = sys::nvmlReturn_enum_NVML_SUCCESS;
const UNINITIALIZED: nvmlReturn_t = sys::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED;
const INVALID_ARGUMENT: nvmlReturn_t = sys::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
const NOT_SUPPORTED: nvmlReturn_t = sys::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
const NOT_FOUND: nvmlReturn_t = sys::nvmlReturn_enum_NVML_ERROR_NOT_FOUND;
const INSUFFICIENT_SIZE: nvmlReturn_t = sys::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
const DRIVER_NOT_LOADED: nvmlReturn_t = sys::nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED;
const TIMEOUT: nvmlReturn_t = sys::nvmlReturn_enum_NVML_ERROR_TIMEOUT;
const VERSION_MISMATCH: nvmlReturn_t = sys::nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH;

/// `NVML_STRUCT_VERSION(Memory, 2)` as nvml.h defines it.
const MEMORY_V2_VERSION: c_uint = (std::mem::size_of::<nvmlMemory_v2_t>() | (2 << 24)) as c_uint;

/// The name of the configuration file looked for next to the library.
pub const CONFIG_FILE_NAME: &str = "fake-nvml.json";
/// The environment variable that overrides the configuration file's path.
pub const CONFIG_ENV: &str = "FAKE_NVML_CONFIG";

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

#[derive(Debug)]
struct Loaded {
    config: FakeConfig,
    key: FileKey,
    /// Undelivered Xid codes per GPU.
    xids: Vec<VecDeque<u64>>,
}

#[derive(Debug, Clone, Copy)]
struct GpmSnapshot {
    gpu: usize,
    /// The GPU instance ID for a MIG sample.
    gpu_instance: Option<u32>,
}

#[derive(Debug)]
struct Runtime {
    loaded: Option<Loaded>,
    init_count: u32,
    next_id: usize,
    /// Event set → registrations `(gpu index, event mask)`.
    event_sets: BTreeMap<usize, Vec<(usize, u64)>>,
    /// GPM sample → what it was last filled from.
    gpm_samples: BTreeMap<usize, Option<GpmSnapshot>>,
}

static STATE: Mutex<Runtime> = Mutex::new(Runtime {
    loaded: None,
    init_count: 0,
    next_id: 1,
    event_sets: BTreeMap::new(),
    gpm_samples: BTreeMap::new(),
});

fn lock() -> MutexGuard<'static, Runtime> {
    // A panic cannot cross the C boundary (it aborts), so a poisoned lock
    // only means an earlier call aborted halfway: the state is still usable.
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The configuration file: `$FAKE_NVML_CONFIG`, else next to this library.
fn config_path() -> Option<PathBuf> {
    static PATH: OnceLock<Option<PathBuf>> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = std::env::var_os(CONFIG_ENV) {
            return Some(PathBuf::from(p));
        }
        let own = library_path()?;
        Some(own.parent()?.join(CONFIG_FILE_NAME))
    })
    .clone()
}

/// The file this library was loaded from, through `dladdr` on one of its own
/// functions.
fn library_path() -> Option<PathBuf> {
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    let addr = library_path as fn() -> Option<PathBuf> as *const c_void;
    // SAFETY: `addr` is the address of a function in this object and `info`
    // is a valid, writable Dl_info; dladdr only writes into it.
    let found = unsafe { libc::dladdr(addr, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr succeeded, so dli_fname points to a NUL-terminated path
    // owned by the dynamic loader for as long as this object is loaded.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes())))
}

impl Runtime {
    /// Re-reads the configuration when the file changed.
    fn refresh(&mut self) {
        let Some(path) = config_path() else {
            return;
        };
        let Ok(meta) = std::fs::metadata(&path) else {
            if self.loaded.is_none() {
                eprintln!(
                    "fake-nvml: no configuration at {} (set {CONFIG_ENV} or put {CONFIG_FILE_NAME} next to the library)",
                    path.display()
                );
            }
            return;
        };
        let key = FileKey {
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        };
        if self.loaded.as_ref().is_some_and(|l| l.key == key) {
            return;
        }
        match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| FakeConfig::parse(&t))
        {
            Ok(config) => {
                let xids = config.xid_queues();
                self.loaded = Some(Loaded { config, key, xids });
            }
            Err(e) => eprintln!(
                "fake-nvml: {}: {e}; keeping the previous one",
                path.display()
            ),
        }
    }

    fn config(&self) -> Result<&FakeConfig, nvmlReturn_t> {
        if self.init_count == 0 {
            return Err(UNINITIALIZED);
        }
        self.loaded
            .as_ref()
            .map(|l| &l.config)
            .ok_or(DRIVER_NOT_LOADED)
    }

    fn next_id(&mut self) -> usize {
        let id = self.next_id;
        self.next_id += 1;
        id
    }
}

/// Runs `f` on the device behind `device`, after the checks every device
/// call makes: initialised, a valid handle, the device not failing.
fn device_query<T>(
    device: nvmlDevice_t,
    f: impl FnOnce(&DeviceView<'_>) -> Result<T, nvmlReturn_t>,
) -> Result<T, nvmlReturn_t> {
    let mut rt = lock();
    rt.refresh();
    let cfg = rt.config()?;
    let dev = DeviceRef::from_raw(device.addr()).ok_or(INVALID_ARGUMENT)?;
    let view = cfg.view(dev).ok_or(INVALID_ARGUMENT)?;
    if let Some(e) = view.failure() {
        return Err(e);
    }
    f(&view)
}

fn handle(dev: DeviceRef) -> nvmlDevice_t {
    std::ptr::without_provenance_mut(dev.to_raw())
}

/// Writes `result` through `out`.
///
/// # Safety
/// `out` is null or valid for a write of `T`.
unsafe fn deliver<T>(out: *mut T, result: Result<T, nvmlReturn_t>) -> nvmlReturn_t {
    match result {
        Err(e) => e,
        Ok(_) if out.is_null() => INVALID_ARGUMENT,
        Ok(v) => {
            // SAFETY: non-null, and valid for writes by the caller's contract.
            unsafe { out.write(v) };
            SUCCESS
        }
    }
}

/// Copies `result` with its terminating NUL into `buf` of `length` bytes.
///
/// # Safety
/// `buf` is null or valid for writes of `length` bytes.
unsafe fn deliver_str(
    buf: *mut c_char,
    length: c_uint,
    result: Result<String, nvmlReturn_t>,
) -> nvmlReturn_t {
    let s = match result {
        Err(e) => return e,
        Ok(s) => s,
    };
    if buf.is_null() {
        return INVALID_ARGUMENT;
    }
    let bytes = s.as_bytes();
    if bytes.len() + 1 > length as usize {
        return INSUFFICIENT_SIZE;
    }
    // SAFETY: `buf` is valid for `length` bytes (caller's contract) and we
    // write `bytes.len() + 1 <= length` of them; source and destination are
    // distinct allocations.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len());
        buf.add(bytes.len()).write(0);
    }
    SUCCESS
}

// ---------------------------------------------------------------------------
// Library and system
// ---------------------------------------------------------------------------

fn init() -> nvmlReturn_t {
    let mut rt = lock();
    rt.refresh();
    let Some(loaded) = rt.loaded.as_ref() else {
        return DRIVER_NOT_LOADED;
    };
    if let Some(e) = loaded.config.init_error {
        return e.code();
    }
    rt.init_count += 1;
    SUCCESS
}

/// # Safety
/// No pointer arguments.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    init()
}

/// # Safety
/// No pointer arguments.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    init()
}

/// # Safety
/// No pointer arguments.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    let mut rt = lock();
    if rt.init_count == 0 {
        return UNINITIALIZED;
    }
    rt.init_count -= 1;
    SUCCESS
}

/// # Safety
/// No pointer arguments; the result is a static string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let s: &'static CStr = match result {
        SUCCESS => c"Success",
        UNINITIALIZED => c"Uninitialized",
        INVALID_ARGUMENT => c"Invalid Argument",
        NOT_SUPPORTED => c"Not Supported",
        NOT_FOUND => c"Not Found",
        INSUFFICIENT_SIZE => c"Insufficient Size",
        DRIVER_NOT_LOADED => c"Driver Not Loaded",
        TIMEOUT => c"Timeout",
        sys::nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST => c"GPU is lost",
        sys::nvmlReturn_enum_NVML_ERROR_RESET_REQUIRED => c"GPU requires reset",
        VERSION_MISMATCH => c"Argument version mismatch",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

/// # Safety
/// `version` is valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let v = {
        let mut rt = lock();
        rt.refresh();
        rt.config().map(|c| c.driver_version.clone())
    };
    // SAFETY: caller's contract on `version`.
    unsafe { deliver_str(version, length, v) }
}

/// # Safety
/// `count` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    let n = {
        let mut rt = lock();
        rt.refresh();
        rt.config().map(|c| c.devices.len() as c_uint)
    };
    // SAFETY: caller's contract on `count`.
    unsafe { deliver(count, n) }
}

/// # Safety
/// `device` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let h = {
        let mut rt = lock();
        rt.refresh();
        rt.config().and_then(|c| {
            let d = DeviceRef {
                gpu: index as usize,
                mig: None,
            };
            let view = c.view(d).ok_or(INVALID_ARGUMENT)?;
            match view.failure() {
                Some(e) => Err(e),
                None => Ok(handle(d)),
            }
        })
    };
    // SAFETY: caller's contract on `device`.
    unsafe { deliver(device, h) }
}

/// # Safety
/// `uuid` is a NUL-terminated string; `device` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    if uuid.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    let wanted = unsafe { CStr::from_ptr(uuid) }
        .to_string_lossy()
        .into_owned();
    let h = {
        let mut rt = lock();
        rt.refresh();
        rt.config()
            .and_then(|c| c.find_uuid(&wanted).map(handle).ok_or(NOT_FOUND))
    };
    // SAFETY: caller's contract on `device`.
    unsafe { deliver(device, h) }
}

// ---------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------

/// # Safety
/// `uuid` is valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let r = device_query(device, |d| Ok(d.uuid().to_string()));
    // SAFETY: caller's contract on `uuid`.
    unsafe { deliver_str(uuid, length, r) }
}

/// # Safety
/// `name` is valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let r = device_query(device, |d| Ok(d.name().to_string()));
    // SAFETY: caller's contract on `name`.
    unsafe { deliver_str(name, length, r) }
}

/// # Safety
/// `index` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(
    device: nvmlDevice_t,
    index: *mut c_uint,
) -> nvmlReturn_t {
    let r = device_query(device, |d| Ok(d.gpu_index as c_uint));
    // SAFETY: caller's contract on `index`.
    unsafe { deliver(index, r) }
}

/// # Safety
/// `pci` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    let r = device_query(device, |d| {
        let bus_id = d.pci_bus_id();
        let mut info = nvmlPciInfo_t {
            busIdLegacy: [0; 16],
            domain: 0,
            bus: (d.gpu_index + 0x18) as c_uint,
            device: 0,
            pciDeviceId: 0x2335_10de,
            pciSubSystemId: 0x18be_10de,
            busId: [0; 32],
        };
        for (dst, src) in info.busId.iter_mut().zip(bus_id.bytes().take(31)) {
            *dst = src as c_char;
        }
        for (dst, src) in info.busIdLegacy.iter_mut().zip(bus_id.bytes().take(15)) {
            *dst = src as c_char;
        }
        Ok(info)
    });
    // SAFETY: caller's contract on `pci`.
    unsafe { deliver(pci, r) }
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// # Safety
/// `memory` is null or valid for reads and writes of `nvmlMemory_v2_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    if memory.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null and valid for reads by the caller's contract; the
    // caller sets `version` before the call.
    let version = unsafe { (*memory).version };
    if version != MEMORY_V2_VERSION {
        return VERSION_MISMATCH;
    }
    let r = device_query(device, |d| {
        d.metrics().memory.get().map(|m| nvmlMemory_v2_t {
            version,
            total: m.total,
            reserved: m.reserved,
            free: m.free,
            used: m.used,
        })
    });
    // SAFETY: caller's contract on `memory`.
    unsafe { deliver(memory, r) }
}

/// # Safety
/// `utilization` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    utilization: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    let r = device_query(device, |d| {
        if d.mig.is_some() {
            // Not available per MIG device on real hardware either.
            return Err(NOT_SUPPORTED);
        }
        d.metrics().utilization.get().map(|u| nvmlUtilization_t {
            gpu: u.gpu,
            memory: u.memory,
        })
    });
    // SAFETY: caller's contract on `utilization`.
    unsafe { deliver(utilization, r) }
}

/// # Safety
/// `power` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: nvmlDevice_t,
    power: *mut c_uint,
) -> nvmlReturn_t {
    let r = device_query(device, |d| d.metrics().power_mw.get());
    // SAFETY: caller's contract on `power`.
    unsafe { deliver(power, r) }
}

/// # Safety
/// `limit` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(
    device: nvmlDevice_t,
    limit: *mut c_uint,
) -> nvmlReturn_t {
    let r = device_query(device, |d| d.metrics().power_limit_mw.get());
    // SAFETY: caller's contract on `limit`.
    unsafe { deliver(limit, r) }
}

/// # Safety
/// `temp` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    sensor: c_uint,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    let r = device_query(device, |d| {
        if sensor != sys::nvmlTemperatureSensors_enum_NVML_TEMPERATURE_GPU {
            return Err(INVALID_ARGUMENT);
        }
        d.metrics().temperature_c.get()
    });
    // SAFETY: caller's contract on `temp`.
    unsafe { deliver(temp, r) }
}

/// # Safety
/// `clock` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: nvmlDevice_t,
    clock_type: c_uint,
    clock: *mut c_uint,
) -> nvmlReturn_t {
    let r = device_query(device, |d| {
        if clock_type != sys::nvmlClockType_enum_NVML_CLOCK_SM {
            return Err(NOT_SUPPORTED);
        }
        d.metrics().sm_clock_mhz.get()
    });
    // SAFETY: caller's contract on `clock`.
    unsafe { deliver(clock, r) }
}

/// # Safety
/// `reasons` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    device: nvmlDevice_t,
    reasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    let r = device_query(device, |d| d.metrics().throttle_reasons.get());
    // SAFETY: caller's contract on `reasons`.
    unsafe { deliver(reasons, r) }
}

/// # Safety
/// `count` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: nvmlDevice_t,
    error_type: c_uint,
    counter_type: c_uint,
    count: *mut c_ulonglong,
) -> nvmlReturn_t {
    let r = device_query(device, |d| {
        if error_type != sys::nvmlMemoryErrorType_enum_NVML_MEMORY_ERROR_TYPE_UNCORRECTED
            || counter_type != sys::nvmlEccCounterType_enum_NVML_VOLATILE_ECC
        {
            return Err(NOT_SUPPORTED);
        }
        d.metrics().ecc_uncorrected_volatile.get()
    });
    // SAFETY: caller's contract on `count`.
    unsafe { deliver(count, r) }
}

/// # Safety
/// `energy` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: nvmlDevice_t,
    energy: *mut c_ulonglong,
) -> nvmlReturn_t {
    let r = device_query(device, |d| d.metrics().energy_mj.get());
    // SAFETY: caller's contract on `energy`.
    unsafe { deliver(energy, r) }
}

/// Processes report the GPU instance they run in, which is how the NVML
/// source learns a MIG device's GPU instance ID without unwrapped calls.
///
/// # Safety
/// `count` is valid for reads and writes; `infos` is null or valid for
/// `*count` writes of `nvmlProcessInfo_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    if count.is_null() {
        return INVALID_ARGUMENT;
    }
    let procs = match device_query(device, |d| Ok(d.processes())) {
        Ok(p) => p,
        Err(e) => return e,
    };
    // SAFETY: non-null and valid for reads by the caller's contract.
    let capacity = unsafe { count.read() } as usize;
    // SAFETY: as above, valid for writes.
    unsafe { count.write(procs.len() as c_uint) };
    if infos.is_null() || capacity < procs.len() {
        return if procs.is_empty() {
            SUCCESS
        } else {
            INSUFFICIENT_SIZE
        };
    }
    for (i, (pid, gi, ci)) in procs.into_iter().enumerate() {
        let info = nvmlProcessInfo_t {
            pid,
            usedGpuMemory: 1 << 30,
            gpuInstanceId: gi,
            computeInstanceId: ci,
        };
        // SAFETY: `i < procs.len() <= capacity`, the number of elements the
        // caller said `infos` holds.
        unsafe { infos.add(i).write(info) };
    }
    SUCCESS
}

// ---------------------------------------------------------------------------
// MIG
// ---------------------------------------------------------------------------

/// # Safety
/// `current` and `pending` are null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: nvmlDevice_t,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> nvmlReturn_t {
    let r = device_query(device, |d| {
        if d.mig.is_some() {
            return Err(NOT_SUPPORTED);
        }
        d.gpu.mig_mode.get()
    });
    match r {
        Err(e) => e,
        Ok(m) => {
            // SAFETY: caller's contract on both pointers.
            let a = unsafe { deliver(current, Ok(c_uint::from(m.current))) };
            if a != SUCCESS {
                return a;
            }
            // SAFETY: as above.
            unsafe { deliver(pending, Ok(c_uint::from(m.pending))) }
        }
    }
}

/// # Safety
/// `count` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(
    device: nvmlDevice_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    let r = device_query(device, |d| {
        if d.mig.is_some() {
            return Err(INVALID_ARGUMENT);
        }
        match d.gpu.mig_mode {
            Reading::Error(e) => Err(e.code()),
            // Real GPUs report their slot count (7 on H100) whatever is configured.
            Reading::Value(_) => Ok(7.max(d.gpu.mig_devices.len()) as c_uint),
        }
    });
    // SAFETY: caller's contract on `count`.
    unsafe { deliver(count, r) }
}

/// # Safety
/// `mig_device` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: nvmlDevice_t,
    index: c_uint,
    mig_device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let r = device_query(device, |d| {
        if d.mig.is_some() {
            return Err(INVALID_ARGUMENT);
        }
        if !d.mig_enabled() {
            return Err(NOT_SUPPORTED);
        }
        if (index as usize) < d.gpu.mig_devices.len() {
            Ok(handle(DeviceRef {
                gpu: d.gpu_index,
                mig: Some(index as usize),
            }))
        } else {
            // An empty slot.
            Err(NOT_FOUND)
        }
    });
    // SAFETY: caller's contract on `mig_device`.
    unsafe { deliver(mig_device, r) }
}

/// # Safety
/// `device` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
    mig_device: nvmlDevice_t,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let r = device_query(mig_device, |d| match d.mig {
        Some(_) => Ok(handle(DeviceRef {
            gpu: d.gpu_index,
            mig: None,
        })),
        None => Err(INVALID_ARGUMENT),
    });
    // SAFETY: caller's contract on `device`.
    unsafe { deliver(device, r) }
}

/// # Safety
/// `is_mig` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceIsMigDeviceHandle(
    device: nvmlDevice_t,
    is_mig: *mut c_uint,
) -> nvmlReturn_t {
    let r = device_query(device, |d| Ok(c_uint::from(d.mig.is_some())));
    // SAFETY: caller's contract on `is_mig`.
    unsafe { deliver(is_mig, r) }
}

// ---------------------------------------------------------------------------
// GPM
// ---------------------------------------------------------------------------

fn gpm_of<'a>(d: &DeviceView<'a>) -> &'a Reading<config::FakeGpm> {
    match d.mig {
        Some(m) => &m.gpm,
        None => &d.gpu.gpm,
    }
}

/// # Safety
/// `support` is null or valid for reads and writes of `nvmlGpmSupport_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmQueryDeviceSupport(
    device: nvmlDevice_t,
    support: *mut nvmlGpmSupport_t,
) -> nvmlReturn_t {
    if support.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null, valid for reads by the caller's contract.
    let version = unsafe { (*support).version };
    if version != sys::NVML_GPM_SUPPORT_VERSION {
        return VERSION_MISMATCH;
    }
    let r = device_query(device, |d| {
        let supported = match gpm_of(d) {
            Reading::Value(g) => g.supported,
            Reading::Error(e) if *e == config::ErrorCode::NotSupported => false,
            Reading::Error(e) => return Err(e.code()),
        };
        Ok(nvmlGpmSupport_t {
            version,
            isSupportedDevice: c_uint::from(supported),
        })
    });
    // SAFETY: caller's contract on `support`.
    unsafe { deliver(support, r) }
}

/// # Safety
/// `sample` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmSampleAlloc(sample: *mut nvmlGpmSample_t) -> nvmlReturn_t {
    let r = {
        let mut rt = lock();
        match rt.config() {
            Err(e) => Err(e),
            Ok(_) => {
                let id = rt.next_id();
                rt.gpm_samples.insert(id, None);
                Ok(std::ptr::without_provenance_mut(id))
            }
        }
    };
    // SAFETY: caller's contract on `sample`.
    unsafe { deliver(sample, r) }
}

/// # Safety
/// No pointer is dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmSampleFree(sample: nvmlGpmSample_t) -> nvmlReturn_t {
    let mut rt = lock();
    match rt.gpm_samples.remove(&sample.addr()) {
        Some(_) => SUCCESS,
        None => INVALID_ARGUMENT,
    }
}

fn gpm_fill(
    device: nvmlDevice_t,
    gpu_instance: Option<u32>,
    sample: nvmlGpmSample_t,
) -> nvmlReturn_t {
    let filled = device_query(device, |d| {
        if d.mig.is_some() {
            // GPM samples are taken on the parent GPU (per GPU instance
            // through nvmlGpmMigSampleGet).
            return Err(INVALID_ARGUMENT);
        }
        let gpm = match gpu_instance {
            None => gpm_of(d),
            Some(gi) => {
                let mig = d
                    .gpu
                    .mig_devices
                    .iter()
                    .find(|m| m.gpu_instance_id == gi)
                    .filter(|_| d.mig_enabled())
                    .ok_or(NOT_FOUND)?;
                &mig.gpm
            }
        };
        match gpm {
            Reading::Value(g) if g.supported => Ok(GpmSnapshot {
                gpu: d.gpu_index,
                gpu_instance,
            }),
            Reading::Value(_) => Err(NOT_SUPPORTED),
            Reading::Error(e) => Err(e.code()),
        }
    });
    match filled {
        Err(e) => e,
        Ok(snap) => {
            let mut rt = lock();
            match rt.gpm_samples.get_mut(&sample.addr()) {
                Some(slot) => {
                    *slot = Some(snap);
                    SUCCESS
                }
                None => INVALID_ARGUMENT,
            }
        }
    }
}

/// # Safety
/// No pointer is dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmSampleGet(
    device: nvmlDevice_t,
    sample: nvmlGpmSample_t,
) -> nvmlReturn_t {
    gpm_fill(device, None, sample)
}

/// # Safety
/// No pointer is dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmMigSampleGet(
    device: nvmlDevice_t,
    gpu_instance_id: c_uint,
    sample: nvmlGpmSample_t,
) -> nvmlReturn_t {
    gpm_fill(device, Some(gpu_instance_id), sample)
}

/// Per-metric values from the configuration of the device both samples were
/// taken on. The metric names point to static strings.
///
/// # Safety
/// `request` is null or valid for reads and writes of `nvmlGpmMetricsGet_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmMetricsGet(request: *mut nvmlGpmMetricsGet_t) -> nvmlReturn_t {
    if request.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null and valid for reads and writes by the caller's
    // contract; no other reference to it exists during this call.
    let req = unsafe { &mut *request };
    if req.version != sys::NVML_GPM_METRICS_GET_VERSION {
        return VERSION_MISMATCH;
    }
    if req.numMetrics as usize > req.metrics.len() {
        return INVALID_ARGUMENT;
    }
    let mut rt = lock();
    rt.refresh();
    let snapshots = (
        rt.gpm_samples.get(&req.sample1.addr()).copied().flatten(),
        rt.gpm_samples.get(&req.sample2.addr()).copied().flatten(),
    );
    let (Some(a), Some(b)) = snapshots else {
        return INVALID_ARGUMENT;
    };
    if a.gpu != b.gpu || a.gpu_instance != b.gpu_instance {
        return INVALID_ARGUMENT;
    }
    let cfg = match rt.config() {
        Ok(c) => c,
        Err(e) => return e,
    };
    let Some(gpu) = cfg.devices.get(a.gpu) else {
        return INVALID_ARGUMENT;
    };
    if let Some(e) = gpu.fail_all {
        return e.code();
    }
    let gpm = match a.gpu_instance {
        None => &gpu.gpm,
        Some(gi) => match gpu.mig_devices.iter().find(|m| m.gpu_instance_id == gi) {
            Some(m) => &m.gpm,
            None => return NOT_FOUND,
        },
    };
    let gpm = match gpm {
        Reading::Value(g) => g,
        Reading::Error(e) => return e.code(),
    };
    for m in req.metrics.iter_mut().take(req.numMetrics as usize) {
        match gpm_metric(gpm, m.metricId) {
            Ok(v) => {
                m.nvmlReturn = SUCCESS;
                m.value = v;
            }
            Err(e) => {
                m.nvmlReturn = e;
                m.value = 0.0;
            }
        }
        m.metricInfo.shortName = c"fake".as_ptr().cast_mut();
        m.metricInfo.longName = c"fake GPM metric".as_ptr().cast_mut();
        m.metricInfo.unit = c"%".as_ptr().cast_mut();
    }
    SUCCESS
}

// ---------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------

/// # Safety
/// `set` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    let r = {
        let mut rt = lock();
        rt.refresh();
        match rt.config() {
            Err(e) => Err(e),
            Ok(_) => {
                let id = rt.next_id();
                rt.event_sets.insert(id, Vec::new());
                Ok(std::ptr::without_provenance_mut(id))
            }
        }
    };
    // SAFETY: caller's contract on `set`.
    unsafe { deliver(set, r) }
}

/// # Safety
/// `event_types` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: nvmlDevice_t,
    event_types: *mut c_ulonglong,
) -> nvmlReturn_t {
    let r = device_query(device, |_| {
        Ok(c_ulonglong::from(sys::nvmlEventTypeXidCriticalError))
    });
    // SAFETY: caller's contract on `event_types`.
    unsafe { deliver(event_types, r) }
}

/// # Safety
/// No pointer is dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    event_types: c_ulonglong,
    set: nvmlEventSet_t,
) -> nvmlReturn_t {
    let gpu = match device_query(device, |d| {
        if d.mig.is_some() {
            Err(NOT_SUPPORTED)
        } else {
            Ok(d.gpu_index)
        }
    }) {
        Ok(g) => g,
        Err(e) => return e,
    };
    let mut rt = lock();
    match rt.event_sets.get_mut(&set.addr()) {
        Some(regs) => {
            regs.push((gpu, event_types));
            SUCCESS
        }
        None => INVALID_ARGUMENT,
    }
}

/// Delivers the next pending Xid of a GPU registered with `set`, or returns
/// `NVML_ERROR_TIMEOUT` at once (whatever `timeout_ms` says).
///
/// # Safety
/// `data` is null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    _timeout_ms: c_uint,
) -> nvmlReturn_t {
    let r = {
        let mut rt = lock();
        rt.refresh();
        let rt = &mut *rt;
        match (rt.event_sets.get(&set.addr()), rt.loaded.as_mut()) {
            (None, _) => Err(INVALID_ARGUMENT),
            (Some(_), None) => Err(UNINITIALIZED),
            (Some(regs), Some(loaded)) => {
                let xid_bit = c_ulonglong::from(sys::nvmlEventTypeXidCriticalError);
                let mut found = Err(TIMEOUT);
                for (gpu, mask) in regs {
                    if mask & xid_bit == 0 {
                        continue;
                    }
                    if let Some(gpu_cfg) = loaded.config.devices.get(*gpu)
                        && let Some(e) = gpu_cfg.fail_all
                    {
                        found = Err(e.code());
                        break;
                    }
                    if let Some(xid) = loaded.xids.get_mut(*gpu).and_then(VecDeque::pop_front) {
                        found = Ok(nvmlEventData_t {
                            device: handle(DeviceRef {
                                gpu: *gpu,
                                mig: None,
                            }),
                            eventType: xid_bit,
                            eventData: xid,
                            gpuInstanceId: u32::MAX,
                            computeInstanceId: u32::MAX,
                        });
                        break;
                    }
                }
                found
            }
        }
    };
    // SAFETY: caller's contract on `data`.
    unsafe { deliver(data, r) }
}

/// # Safety
/// No pointer is dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> nvmlReturn_t {
    let mut rt = lock();
    match rt.event_sets.remove(&set.addr()) {
        Some(_) => SUCCESS,
        None => INVALID_ARGUMENT,
    }
}
