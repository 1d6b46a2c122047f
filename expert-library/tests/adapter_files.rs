//! Adapters are files beside the sled store: one per stored expert, removed with the record
//! that names it, files no record names removed at open, and records from before (weights
//! inline in sled) still read.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{expert, BagOfWords};
use roe_expert_library::library::{ExpertLibrary, LibraryConfig};
use roe_expert_library::store::ADAPTER_DIR;
use roe_expert_library::{LibraryError, PeftAdapter};

fn open(dir: &Path) -> ExpertLibrary {
    ExpertLibrary::open(dir, Arc::new(BagOfWords::new()), LibraryConfig::default())
        .unwrap()
        .0
}

/// Closes a library and waits for sled to let go of its lock.
fn close(lib: ExpertLibrary) {
    drop(lib);
    std::thread::sleep(std::time::Duration::from_millis(300));
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join(ADAPTER_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn lora() -> PeftAdapter {
    PeftAdapter::from_dir(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/experts/smollm2-135m/lora/sms_spam"),
    )
    .unwrap()
}

#[test]
fn each_expert_has_one_file_and_it_goes_with_the_expert() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let lib = open(dir);
    assert!(files(dir).is_empty());
    let meta = lib.register(expert("a", 3), false).unwrap();
    lib.register(expert("b", 3), false).unwrap();
    let [fa, _fb] = <[String; 2]>::try_from(files(dir)).unwrap();
    let on_disk = std::fs::read(dir.join(ADAPTER_DIR).join(&fa)).unwrap();
    assert_eq!(on_disk, common::adapter().safetensors);
    assert_eq!(lib.adapter("a").unwrap(), common::adapter());
    assert_eq!(meta.weights_bytes, on_disk.len());

    // A new version: its own file, the old one gone.
    let mut v2 = expert("a", 3);
    v2.adapter = lora();
    lib.register(v2, true).unwrap();
    let now = files(dir);
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(
        !now.contains(&fa),
        "the replaced version's file stays: {now:?}"
    );
    assert_eq!(lib.adapter("a").unwrap(), lora());

    lib.delete("a").unwrap();
    lib.delete("b").unwrap();
    assert!(files(dir).is_empty(), "{:?}", files(dir));
    assert!(matches!(
        lib.adapter("a"),
        Err(LibraryError::NotFound { .. })
    ));
}

#[test]
fn files_no_record_names_are_removed_at_open_and_named_ones_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let lib = open(dir);
    lib.register(expert("kept", 2), false).unwrap();
    close(lib);
    let kept = files(dir);
    // What a crash leaves: a file written but never committed, a half-written one.
    let adapters = dir.join(ADAPTER_DIR);
    std::fs::write(adapters.join("00000000000fffff.safetensors"), b"orphan").unwrap();
    std::fs::write(adapters.join("00000000000ffffe.safetensors"), b"").unwrap();
    let lib = open(dir);
    assert_eq!(files(dir), kept);
    assert_eq!(lib.adapter("kept").unwrap(), common::adapter());

    // A named file gone (damage by hand): that expert's read fails clearly, nothing panics.
    close(lib);
    std::fs::remove_file(adapters.join(&kept[0])).unwrap();
    let lib = open(dir);
    let e = lib.adapter("kept").unwrap_err();
    assert!(e.to_string().contains("is missing"), "{e}");
    assert_eq!(lib.get("kept").unwrap().id, "kept");
}

#[test]
fn records_with_inline_weights_still_read_and_become_files_when_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let lib = open(dir);
    lib.register(expert("old", 2), false).unwrap();
    close(lib);
    // Rewrite the record as stores before adapter files held it: u32 config length, the
    // config, the safetensors bytes.
    let a = common::adapter();
    {
        let db = sled::open(dir).unwrap();
        let mut inline = (a.config_json.len() as u32).to_le_bytes().to_vec();
        inline.extend_from_slice(a.config_json.as_bytes());
        inline.extend_from_slice(&a.safetensors);
        db.open_tree("adapters")
            .unwrap()
            .insert("old", inline)
            .unwrap();
        db.flush().unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let lib = open(dir);
    // The file the record no longer names was removed at open.
    assert!(files(dir).is_empty(), "{:?}", files(dir));
    assert_eq!(lib.adapter("old").unwrap(), a);
    let mut v2 = expert("old", 2);
    v2.adapter = lora();
    lib.register(v2, true).unwrap();
    assert_eq!(files(dir).len(), 1);
    assert_eq!(lib.adapter("old").unwrap(), lora());
    lib.delete("old").unwrap();
    assert!(files(dir).is_empty());
}

#[test]
fn a_write_that_fails_on_disk_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let lib = open(dir);
    lib.register(expert("before", 2), false).unwrap();
    // The adapter can no longer be written (as on a full disk: the file write fails).
    let adapters = dir.join(ADAPTER_DIR);
    let moved = dir.join("moved-away");
    std::fs::rename(&adapters, &moved).unwrap();
    std::fs::write(&adapters, b"not a folder").unwrap();
    let e = lib.register(expert("during", 3), false).unwrap_err();
    assert!(matches!(e, LibraryError::Io { .. }), "{e:?}");
    let mut v2 = expert("before", 2);
    v2.adapter = lora();
    assert!(lib.register(v2, true).is_err());
    // Nothing of either write is there: no expert, no new version, no instances routed.
    assert!(matches!(
        lib.get("during"),
        Err(LibraryError::NotFound { .. })
    ));
    assert_eq!(lib.get("before").unwrap().version, 1);
    assert_eq!(lib.len(), 1);
    std::fs::remove_file(&adapters).unwrap();
    std::fs::rename(&moved, &adapters).unwrap();
    assert_eq!(lib.adapter("before").unwrap(), common::adapter());
    assert_eq!(lib.instances("before").unwrap().len(), 2);
    // And writes go on once the disk takes them again.
    lib.register(expert("during", 3), false).unwrap();
    assert_eq!(files(dir).len(), 2);
}

#[test]
fn a_full_disk_is_named_as_such() {
    let e = LibraryError::io("x", std::io::Error::from_raw_os_error(28));
    assert!(e.is_disk_full());
    assert!(!LibraryError::io("x", std::io::Error::from_raw_os_error(13)).is_disk_full());
}
