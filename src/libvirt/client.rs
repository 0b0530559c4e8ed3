//! A running libvirtd, reached through libvirt's own client library (`libvirt.so.0`, loaded at
//! run time with `dlopen`, so snapfs needs it only where a daemon is used). libvirtd keeps
//! snapshot metadata in memory and writes the folder itself: while it runs, snapfs asks it to
//! redefine a snapshot (`virDomainSnapshotCreateXML` with `REDEFINE`), to forget one
//! (`virDomainSnapshotDelete` with `METADATA_ONLY`), and to take a new domain definition
//! (`virDomainDefineXML`), instead of editing files behind it.
//!
//! [`Daemon::connect`] gives `None` when the library is not installed, no daemon answers at the
//! URI, or the daemon does not know the domain: then snapfs writes the folder itself.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};

type Ptr = *mut c_void;

/// `VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE`.
const SNAPSHOT_CREATE_REDEFINE: c_uint = 1;
/// `VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT`.
const SNAPSHOT_CREATE_CURRENT: c_uint = 2;
/// `VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY`.
const SNAPSHOT_DELETE_METADATA_ONLY: c_uint = 2;
/// `VIR_DOMAIN_SNAPSHOT_XML_SECURE`.
const SNAPSHOT_XML_SECURE: c_uint = 1;
/// `VIR_DOMAIN_XML_SECURE | VIR_DOMAIN_XML_INACTIVE`.
const DOMAIN_XML_SECURE_INACTIVE: c_uint = 1 | 2;

/// The entry points used, from `libvirt.so.0`.
struct Api {
    close: unsafe extern "C" fn(Ptr) -> c_int,
    lookup_domain: unsafe extern "C" fn(Ptr, *const c_char) -> Ptr,
    domain_free: unsafe extern "C" fn(Ptr) -> c_int,
    domain_xml: unsafe extern "C" fn(Ptr, c_uint) -> *mut c_char,
    define_xml: unsafe extern "C" fn(Ptr, *const c_char) -> Ptr,
    snapshot_create_xml: unsafe extern "C" fn(Ptr, *const c_char, c_uint) -> Ptr,
    snapshot_lookup: unsafe extern "C" fn(Ptr, *const c_char, c_uint) -> Ptr,
    snapshot_xml: unsafe extern "C" fn(Ptr, c_uint) -> *mut c_char,
    snapshot_delete: unsafe extern "C" fn(Ptr, c_uint) -> c_int,
    snapshot_free: unsafe extern "C" fn(Ptr) -> c_int,
    last_error: unsafe extern "C" fn() -> *const c_char,
}

/// libvirt's default error handler prints every error on standard error; snapfs reports them
/// itself.
unsafe extern "C" fn quiet(_: Ptr, _: Ptr) {}

/// One connection to a daemon that knows the domain; closed when dropped.
pub struct Daemon {
    api: Api,
    conn: Ptr,
    domain: Ptr,
}

fn symbol<T: Copy>(lib: Ptr, name: &CStr) -> Option<T> {
    // SAFETY: dlsym on a handle dlopen returned; the caller names the symbol's C type as T.
    let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
    (!p.is_null()).then(|| {
        // SAFETY: T is a function pointer type of pointer size.
        unsafe { std::mem::transmute_copy::<Ptr, T>(&p) }
    })
}

impl Daemon {
    /// Connects to `uri` and looks `domain` up; `None` when there is no library, no daemon or
    /// no such domain.
    pub fn connect(uri: &str, domain: &str) -> Option<Daemon> {
        let (uri, name) = (CString::new(uri).ok()?, CString::new(domain).ok()?);
        // SAFETY: dlopen of a library by name; the handle is never closed (libvirt keeps
        // threads and state of its own once used).
        let lib =
            unsafe { libc::dlopen(c"libvirt.so.0".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if lib.is_null() {
            return None;
        }
        let api = Api {
            close: symbol(lib, c"virConnectClose")?,
            lookup_domain: symbol(lib, c"virDomainLookupByName")?,
            domain_free: symbol(lib, c"virDomainFree")?,
            domain_xml: symbol(lib, c"virDomainGetXMLDesc")?,
            define_xml: symbol(lib, c"virDomainDefineXML")?,
            snapshot_create_xml: symbol(lib, c"virDomainSnapshotCreateXML")?,
            snapshot_lookup: symbol(lib, c"virDomainSnapshotLookupByName")?,
            snapshot_xml: symbol(lib, c"virDomainSnapshotGetXMLDesc")?,
            snapshot_delete: symbol(lib, c"virDomainSnapshotDelete")?,
            snapshot_free: symbol(lib, c"virDomainSnapshotFree")?,
            last_error: symbol(lib, c"virGetLastErrorMessage")?,
        };
        let set_error_func: unsafe extern "C" fn(Ptr, unsafe extern "C" fn(Ptr, Ptr)) =
            symbol(lib, c"virSetErrorFunc")?;
        let open: unsafe extern "C" fn(*const c_char) -> Ptr = symbol(lib, c"virConnectOpen")?;
        // SAFETY: the libvirt calls below take the C strings and handles as documented.
        unsafe {
            set_error_func(std::ptr::null_mut(), quiet);
            let conn = open(uri.as_ptr());
            if conn.is_null() {
                return None;
            }
            let dom = (api.lookup_domain)(conn, name.as_ptr());
            if dom.is_null() {
                (api.close)(conn);
                return None;
            }
            Some(Daemon {
                api,
                conn,
                domain: dom,
            })
        }
    }

    fn error(&self, what: &str) -> String {
        // SAFETY: virGetLastErrorMessage returns a static or thread-local string, never NULL.
        let msg = unsafe { CStr::from_ptr((self.api.last_error)()) };
        format!("libvirtd: {what}: {}", msg.to_string_lossy())
    }

    /// Takes ownership of a string libvirt allocated.
    fn take_string(&self, p: *mut c_char, what: &str) -> Result<String, String> {
        if p.is_null() {
            return Err(self.error(what));
        }
        // SAFETY: a NUL-terminated string from libvirt, freed with free() as documented.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        unsafe { libc::free(p.cast()) };
        Ok(s)
    }

    /// Redefines (or defines) the snapshot `xml` describes, and makes it current if `current`.
    pub fn redefine(&self, xml: &str, current: bool) -> Result<(), String> {
        let xml = CString::new(xml).map_err(|_| "snapshot XML holds NUL".to_owned())?;
        let mut flags = SNAPSHOT_CREATE_REDEFINE;
        if current {
            flags |= SNAPSHOT_CREATE_CURRENT;
        }
        // SAFETY: a live domain handle and a C string.
        let snap = unsafe { (self.api.snapshot_create_xml)(self.domain, xml.as_ptr(), flags) };
        if snap.is_null() {
            return Err(self.error("redefining the snapshot"));
        }
        // SAFETY: a snapshot handle libvirt returned.
        unsafe { (self.api.snapshot_free)(snap) };
        Ok(())
    }

    fn with_snapshot<T>(
        &self,
        name: &str,
        f: impl FnOnce(Ptr) -> Result<T, String>,
    ) -> Result<T, String> {
        let c = CString::new(name).map_err(|_| "snapshot name holds NUL".to_owned())?;
        // SAFETY: a live domain handle and a C string.
        let snap = unsafe { (self.api.snapshot_lookup)(self.domain, c.as_ptr(), 0) };
        if snap.is_null() {
            return Err(self.error(&format!("snapshot {name}")));
        }
        let out = f(snap);
        // SAFETY: the handle looked up above.
        unsafe { (self.api.snapshot_free)(snap) };
        out
    }

    /// The daemon's XML of snapshot `name` (with its `<domain>`, secrets included).
    pub fn snapshot_xml(&self, name: &str) -> Result<String, String> {
        self.with_snapshot(name, |snap| {
            // SAFETY: a live snapshot handle.
            let p = unsafe { (self.api.snapshot_xml)(snap, SNAPSHOT_XML_SECURE) };
            self.take_string(p, &format!("the XML of snapshot {name}"))
        })
    }

    /// Forgets snapshot `name` (its metadata only; the disks are snapfs's business): its children
    /// take its parent, as `virsh snapshot-delete --metadata` does.
    pub fn forget(&self, name: &str) -> Result<(), String> {
        self.with_snapshot(name, |snap| {
            // SAFETY: a live snapshot handle.
            let rc = unsafe { (self.api.snapshot_delete)(snap, SNAPSHOT_DELETE_METADATA_ONLY) };
            if rc < 0 {
                Err(self.error(&format!("forgetting snapshot {name}")))
            } else {
                Ok(())
            }
        })
    }

    /// The domain's inactive definition.
    pub fn domain_xml(&self) -> Result<String, String> {
        // SAFETY: a live domain handle.
        let p = unsafe { (self.api.domain_xml)(self.domain, DOMAIN_XML_SECURE_INACTIVE) };
        self.take_string(p, "the domain definition")
    }

    /// Defines the domain anew from `xml` (`virsh define`).
    pub fn define(&self, xml: &str) -> Result<(), String> {
        let xml = CString::new(xml).map_err(|_| "domain XML holds NUL".to_owned())?;
        // SAFETY: a live connection and a C string.
        let dom = unsafe { (self.api.define_xml)(self.conn, xml.as_ptr()) };
        if dom.is_null() {
            return Err(self.error("defining the domain"));
        }
        // SAFETY: the handle returned above.
        unsafe { (self.api.domain_free)(dom) };
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: the handles this value owns.
        unsafe {
            (self.api.domain_free)(self.domain);
            (self.api.close)(self.conn);
        }
    }
}
