use super::*;

fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![
        MemoryRegion {
            gpa: 0,
            size: 0xc000_0000,
        },
        MemoryRegion {
            gpa: 0x1_0000_0000,
            size: 0x4000_0000,
        },
    ])
    .unwrap()
}

fn hello() -> Hello {
    Hello {
        versions: VersionRange::ours(),
        machine_type: "q35".into(),
        memory: layout(),
        vcpus: 2,
        mode: MigrationMode::Copy,
        launcher_version: "0.1.0".into(),
    }
}

fn caps() -> ReceiverCapabilities {
    ReceiverCapabilities {
        accepted_versions: VersionRange::ours(),
        machine_types: vec!["q35".into()],
        max_memory_bytes: 8 << 30,
        max_vcpus: 8,
        local_mode: true,
    }
}

#[test]
fn preamble_roundtrip_and_garbage() {
    assert_eq!(decode_preamble(&encode_preamble(7)), Ok(7));
    let mut g = *b"GET / HTTP/1";
    assert!(matches!(
        decode_preamble(&g),
        Err(ProtocolError::BadMagic { .. })
    ));
    g = encode_preamble(1);
    g[3] ^= 1;
    assert!(decode_preamble(&g).is_err());
}

#[test]
fn version_acceptance() {
    let ours = VersionRange { min: 4, max: 5 };
    assert_eq!(
        negotiate_version(VersionRange { min: 4, max: 4 }, ours),
        Ok(4)
    );
    assert_eq!(
        negotiate_version(VersionRange { min: 1, max: 9 }, ours),
        Ok(5)
    );
    let err = negotiate_version(VersionRange { min: 3, max: 3 }, ours).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("version 3") && msg.contains("4..=5"), "{msg}");
    assert!(negotiate_version(VersionRange { min: 6, max: 6 }, ours).is_err());
    assert!(negotiate_version(VersionRange { min: 5, max: 4 }, ours).is_err());
}

#[test]
fn hello_checks() {
    assert_eq!(check_hello(&hello(), &caps()), Ok(PROTOCOL_VERSION));
    let mut h = hello();
    h.machine_type = "pc-i440fx".into();
    assert!(matches!(
        check_hello(&h, &caps()),
        Err(RefuseReason::UnknownMachineType { .. })
    ));
    let mut h = hello();
    h.versions = VersionRange { min: 99, max: 99 };
    let e = check_hello(&h, &caps()).unwrap_err().to_string();
    assert!(
        e.contains("99") && e.contains(&PROTOCOL_VERSION.to_string()),
        "{e}"
    );
    let mut h = hello();
    h.vcpus = 0;
    assert!(check_hello(&h, &caps()).is_err());
    let mut c = caps();
    c.max_memory_bytes = 1 << 30;
    assert!(check_hello(&hello(), &c).is_err());
    c = caps();
    c.local_mode = false;
    let mut h = hello();
    h.mode = MigrationMode::Local;
    assert!(check_hello(&h, &c).is_err());
}

#[test]
fn layout_validation() {
    assert!(MemoryLayout::new(vec![]).is_err());
    assert!(MemoryLayout::new(vec![MemoryRegion { gpa: 0, size: 0 }]).is_err());
    assert!(MemoryLayout::new(vec![MemoryRegion { gpa: 1, size: 4096 }]).is_err());
    assert!(MemoryLayout::new(vec![MemoryRegion {
        gpa: u64::MAX - 4095,
        size: 8192
    }])
    .is_err());
    assert!(MemoryLayout::new(vec![
        MemoryRegion { gpa: 0, size: 8192 },
        MemoryRegion {
            gpa: 4096,
            size: 4096
        }
    ])
    .is_err());
    let l = layout();
    assert_eq!(l.total_bytes(), 4 << 30);
    assert_eq!(l.region_containing(0xbfff_f000, 0x1000), Some(0));
    assert_eq!(l.region_containing(0xbfff_f000, 0x2000), None);
    assert_eq!(l.region_containing(0x1_0000_0000, 4096), Some(1));
    assert_eq!(l.region_containing(u64::MAX, 2), None);
    assert_eq!(l.region_containing(0, 0), None);
}

#[test]
fn memory_fds_must_match_layout() {
    let l = layout();
    let fds: Vec<FdRegion> = l
        .regions
        .iter()
        .map(|r| FdRegion {
            gpa: r.gpa,
            size: r.size,
            file_offset: 0,
        })
        .collect();
    assert!(check_memory_fds(&fds, &l).is_ok());
    assert!(check_memory_fds(&fds[..1], &l).is_err());
    let mut f2 = fds.clone();
    f2[1].size += 4096;
    assert!(check_memory_fds(&f2, &l).is_err());
}

#[test]
fn receiver_phase_copy_version_1() {
    // The stream of a version-1 sender: no SwitchOver.
    let mut p = ReceiverPhase::accepted(MigrationMode::Copy, 1);
    p.advance(Incoming::Memory).unwrap();
    p.advance(Incoming::IterationDone(0)).unwrap();
    p.advance(Incoming::Memory).unwrap();
    assert!(p.clone().advance(Incoming::IterationDone(5)).is_err());
    assert!(p.clone().advance(Incoming::Complete).is_err());
    assert!(p.clone().advance(Incoming::MemoryFds).is_err());
    assert!(p.clone().advance(Incoming::Go).is_err());
    p.advance(Incoming::IterationDone(1)).unwrap();
    p.advance(Incoming::Memory).unwrap();
    p.advance(Incoming::State).unwrap();
    assert!(p.clone().advance(Incoming::Memory).is_err());
    assert!(p.clone().advance(Incoming::State).is_err());
    p.advance(Incoming::Complete).unwrap();
    assert_eq!(p, ReceiverPhase::AwaitGo);
    let mut c = p.clone();
    assert!(matches!(
        c.advance(Incoming::Cancel),
        Err(ProtocolError::Cancelled(_))
    ));
    assert_eq!(c, ReceiverPhase::Failed);
    p.advance(Incoming::Go).unwrap();
    assert_eq!(p, ReceiverPhase::Started);
    assert!(p.advance(Incoming::Cancel).is_err());
}

#[test]
fn receiver_phase_local_version_1() {
    let mut p = ReceiverPhase::accepted(MigrationMode::Local, 1);
    p.advance(Incoming::MemoryFds).unwrap();
    assert!(
        p.clone().advance(Incoming::SwitchOver).is_err(),
        "SwitchOver is not in version 1"
    );
    p.advance(Incoming::State).unwrap();
    p.advance(Incoming::Complete).unwrap();
    p.advance(Incoming::Go).unwrap();
}

#[test]
fn receiver_phase_local() {
    let mut p = ReceiverPhase::accepted(MigrationMode::Local, PROTOCOL_VERSION);
    assert!(p.clone().advance(Incoming::Memory).is_err());
    assert!(p.clone().advance(Incoming::State).is_err());
    p.advance(Incoming::MemoryFds).unwrap();
    assert!(p.clone().advance(Incoming::MemoryFds).is_err());
    assert!(
        p.clone().advance(Incoming::State).is_err(),
        "version 2: the state without SwitchOver"
    );
    p.advance(Incoming::SwitchOver).unwrap();
    p.advance(Incoming::State).unwrap();
    p.advance(Incoming::Complete).unwrap();
    p.advance(Incoming::Go).unwrap();
    assert!(ReceiverPhase::AwaitHello.advance(Incoming::Hello).is_err());
}

#[test]
fn receiver_phase_local_with_tap_fds() {
    let mut p = ReceiverPhase::accepted(MigrationMode::Local, PROTOCOL_VERSION);
    assert!(
        p.clone().advance(Incoming::NetFds).is_err(),
        "before MemoryFds"
    );
    p.advance(Incoming::MemoryFds).unwrap();
    p.advance(Incoming::NetFds).unwrap();
    assert!(p.clone().advance(Incoming::NetFds).is_err(), "twice");
    p.advance(Incoming::SwitchOver).unwrap();
    p.advance(Incoming::State).unwrap();
    assert!(
        p.clone().advance(Incoming::NetFds).is_err(),
        "after the state"
    );
    p.advance(Incoming::Complete).unwrap();
    let mut c = ReceiverPhase::accepted(MigrationMode::Copy, PROTOCOL_VERSION);
    assert!(c.advance(Incoming::NetFds).is_err(), "copy mode");
}

#[test]
fn receiver_phase_copy_version_2_switch_over() {
    let mut p = ReceiverPhase::accepted(MigrationMode::Copy, 2);
    p.advance(Incoming::Memory).unwrap();
    p.advance(Incoming::IterationDone(0)).unwrap();
    assert!(
        p.clone().advance(Incoming::State).is_err(),
        "the state before SwitchOver"
    );
    p.advance(Incoming::SwitchOver).unwrap();
    // The final pages follow it.
    p.advance(Incoming::Memory).unwrap();
    p.advance(Incoming::Memory).unwrap();
    let mut twice = p.clone();
    assert!(matches!(
        twice.advance(Incoming::SwitchOver),
        Err(ProtocolError::UnexpectedMessage {
            got: "SwitchOver",
            ..
        })
    ));
    assert_eq!(twice, ReceiverPhase::Failed);
    assert!(
        p.clone().advance(Incoming::IterationDone(1)).is_err(),
        "no iteration after the switch-over"
    );
    assert!(p.clone().advance(Incoming::Complete).is_err());
    p.advance(Incoming::State).unwrap();
    assert!(
        p.clone().advance(Incoming::SwitchOver).is_err(),
        "SwitchOver after the state"
    );
    p.advance(Incoming::Complete).unwrap();
    assert!(p.clone().advance(Incoming::SwitchOver).is_err());
    p.advance(Incoming::Go).unwrap();
    assert_eq!(p, ReceiverPhase::Started);
    // A version-1 stream may not carry it.
    let mut v1 = ReceiverPhase::accepted(MigrationMode::Copy, 1);
    v1.advance(Incoming::Memory).unwrap();
    assert!(v1.advance(Incoming::SwitchOver).is_err());
    assert_eq!(v1, ReceiverPhase::Failed);
}

#[test]
fn version_2_is_accepted_with_its_predecessor() {
    assert_eq!((MIN_ACCEPTED_VERSION, PROTOCOL_VERSION), (1, 2));
    // A version-1 sender (offers 1..=1) gets version 1; so does a version-1 receiver.
    assert_eq!(
        check_hello(
            &Hello {
                versions: VersionRange { min: 1, max: 1 },
                ..hello()
            },
            &caps()
        ),
        Ok(1)
    );
    assert_eq!(
        negotiate_version(VersionRange::ours(), VersionRange { min: 1, max: 1 }),
        Ok(1)
    );
}

#[test]
fn switch_over_is_appended_after_the_old_messages() {
    let b = bincode::serialize(&SenderMessage::SwitchOver).unwrap();
    assert_eq!(b, 8u32.to_le_bytes());
}

#[test]
fn net_fds_is_appended_after_the_old_messages() {
    // Variant index 7: the encodings of messages 0..=6 are unchanged.
    let b = bincode::serialize(&SenderMessage::NetFds { count: 2 }).unwrap();
    assert_eq!(&b[..4], &7u32.to_le_bytes());
}

#[test]
fn sender_phase() {
    let mut s = SenderPhase::AwaitAccept;
    assert!(s.source_may_resume());
    s.advance(&ReceiverMessage::Accept {
        version: PROTOCOL_VERSION,
    })
    .unwrap();
    assert!(s.sent_go().is_err());
    let mut s = SenderPhase::Precopy;
    s.sent_complete().unwrap();
    s.advance(&ReceiverMessage::Ready).unwrap();
    s.sent_go().unwrap();
    assert!(!s.source_may_resume());
    let mut aborted = s;
    assert!(matches!(
        aborted.advance(&ReceiverMessage::Abort { reason: "x".into() }),
        Err(ProtocolError::Aborted(_))
    ));
    assert!(aborted.source_may_resume());
    // After Go, an error that is not an Abort leaves the outcome unknown.
    let mut unknown = s;
    assert!(unknown
        .advance(&ReceiverMessage::Error { reason: "?".into() })
        .is_err());
    assert!(unknown.advance(&ReceiverMessage::Ready).is_err());
    assert_eq!(unknown, SenderPhase::AwaitStarted);
    assert!(!unknown.source_may_resume());
    s.advance(&ReceiverMessage::Started {
        resumed_realtime_ns: 1,
        go_to_resume_us: 2,
    })
    .unwrap();
    assert_eq!(s, SenderPhase::Done);

    let mut r = SenderPhase::AwaitAccept;
    let reason = RefuseReason::Other("no".into());
    assert_eq!(
        r.advance(&ReceiverMessage::Refuse {
            reason: reason.clone()
        }),
        Err(ProtocolError::Refused(reason))
    );
    assert!(r.source_may_resume());
    let mut bad = SenderPhase::AwaitAccept;
    assert!(bad
        .advance(&ReceiverMessage::Accept { version: 999 })
        .is_err());
    let mut early = SenderPhase::Precopy;
    assert!(early.advance(&ReceiverMessage::Ready).is_err());
}

#[test]
fn switch_over_ready_is_appended_after_the_old_messages() {
    // Variant index 7: the encodings of receiver messages 0..=6 are unchanged.
    let b = bincode::serialize(&ReceiverMessage::SwitchOverReady).unwrap();
    assert_eq!(b, 7u32.to_le_bytes());
}

#[test]
fn sender_phase_version_2_pauses_only_after_switch_over_ready() {
    let mut s = SenderPhase::Precopy;
    assert!(
        s.clone_advance(&ReceiverMessage::SwitchOverReady).is_err(),
        "SwitchOverReady before SwitchOver"
    );
    s.sent_switch_over().unwrap();
    assert_eq!(s, SenderPhase::AwaitSwitchOverReady);
    assert!(s.source_may_resume());
    assert!(
        s.sent_complete().is_err(),
        "Complete while waiting for SwitchOverReady (the VM has not paused)"
    );
    let mut s = SenderPhase::Precopy;
    s.sent_switch_over().unwrap();
    assert!(s.sent_switch_over().is_err(), "SwitchOver twice");
    let mut s = SenderPhase::AwaitSwitchOverReady;
    s.advance(&ReceiverMessage::SwitchOverReady).unwrap();
    assert_eq!(s, SenderPhase::SwitchingOver);
    assert!(s.source_may_resume());
    assert!(
        s.clone_advance(&ReceiverMessage::SwitchOverReady).is_err(),
        "SwitchOverReady twice"
    );
    s.sent_complete().unwrap();
    s.advance(&ReceiverMessage::Ready).unwrap();
    assert_eq!(s, SenderPhase::ReadyToGo);

    // An error instead of the answer: the source resumes.
    let mut failed = SenderPhase::AwaitSwitchOverReady;
    assert!(failed
        .advance(&ReceiverMessage::Error { reason: "x".into() })
        .is_err());
    assert!(failed.source_may_resume());
    let mut refused = SenderPhase::AwaitSwitchOverReady;
    assert!(refused.advance(&ReceiverMessage::Ready).is_err());
    assert_eq!(refused, SenderPhase::Failed);
}

impl SenderPhase {
    /// `advance` on a copy, leaving `self` as it was.
    fn clone_advance(&self, m: &ReceiverMessage) -> Result<(), ProtocolError> {
        let mut c = *self;
        c.advance(m)
    }
}
