//! The engine GPU's identity for the IPC section (CUDA weights only): its PCI bus id and UUID,
//! from the CUDA driver loaded at run time (`dlopen("libcuda.so.1")`), so that the library links
//! and runs without CUDA. `EPLB_PCI_BUS_ID` overrides the driver (the UUID is then zeros: not
//! checked by the sidecar).

use std::ffi::{c_char, c_int, c_void, CStr};

type CuCtxGetDevice = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuDeviceGetPciBusId = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
type CuDeviceGetUuid = unsafe extern "C" fn(*mut u8, c_int) -> c_int;

fn sym(lib: *mut c_void, name: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: a valid handle and a NUL-terminated name.
    let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
    if p.is_null() {
        return Err(format!("libcuda.so.1 has no {}", name.to_string_lossy()));
    }
    Ok(p)
}

/// (PCI bus id such as `0000:19:00.0`, 16-byte UUID) of the current CUDA context's device.
pub fn device_ids() -> Result<(String, [u8; 16]), String> {
    if let Ok(bus) = std::env::var("EPLB_PCI_BUS_ID") {
        return Ok((bus, [0; 16]));
    }
    let what = "CUDA weights: the IPC section needs the engine GPU's PCI bus id";
    // SAFETY: a NUL-terminated name; RTLD_NOW|RTLD_LOCAL.
    let lib = unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if lib.is_null() {
        return Err(format!("{what}: cannot load libcuda.so.1 (set EPLB_PCI_BUS_ID to give it)"));
    }
    // SAFETY: the symbols have these C signatures (CUDA driver API); the library stays loaded.
    unsafe {
        let get_dev: CuCtxGetDevice = std::mem::transmute(sym(lib, c"cuCtxGetDevice")?);
        let bus_id: CuDeviceGetPciBusId = std::mem::transmute(sym(lib, c"cuDeviceGetPCIBusId")?);
        let mut dev: c_int = 0;
        let rc = get_dev(&mut dev);
        if rc != 0 {
            return Err(format!(
                "{what}: cuCtxGetDevice failed ({rc}: no current CUDA context on this thread? call eplb_create after the weights are on the GPU, on that thread)"
            ));
        }
        let mut buf = [0 as c_char; 32];
        let rc = bus_id(buf.as_mut_ptr(), 32, dev);
        if rc != 0 {
            return Err(format!("{what}: cuDeviceGetPCIBusId failed ({rc})"));
        }
        let bus = CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
        let mut uuid = [0u8; 16];
        if let Ok(p) = sym(lib, c"cuDeviceGetUuid_v2").or_else(|_| sym(lib, c"cuDeviceGetUuid")) {
            let get_uuid: CuDeviceGetUuid = std::mem::transmute(p);
            if get_uuid(uuid.as_mut_ptr(), dev) != 0 {
                uuid = [0; 16];
            }
        }
        Ok((bus, uuid))
    }
}
