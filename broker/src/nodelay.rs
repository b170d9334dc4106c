//! TCP_NODELAY for rumqttd's accepted connections, set from outside rumqttd.
//!
//! rumqttd binds its listening socket inside `Server::start` and never sets TCP_NODELAY on
//! the sockets it accepts, so small packets written back to back (a PUBACK, then the
//! forwarded PUBLISH) wait for the peer's delayed ACK: ~40 ms per QoS 1 request/response.
//! On Linux an accepted socket inherits TCP_NODELAY from its listening socket. The listener
//! lives in this process, so once it is bound we find its file descriptor (a listening TCP
//! socket bound to exactly our address) and set the option on it. Every connection
//! accepted afterwards has Nagle off.

use std::net::SocketAddr;

/// Sets TCP_NODELAY on this process's listening socket bound to `addr`.
/// Returns whether such a socket was found and changed.
#[cfg(target_os = "linux")]
pub(crate) fn set_on_listener(addr: SocketAddr) -> std::io::Result<bool> {
    let mut changed = false;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::c_int>().ok())
        else {
            continue;
        };
        if is_tcp_listener_on(fd, addr) {
            set_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
            changed = true;
        }
    }
    Ok(changed)
}

/// Other systems: rumqttd's default (Nagle on) stays.
#[cfg(not(target_os = "linux"))]
pub(crate) fn set_on_listener(_addr: SocketAddr) -> std::io::Result<bool> {
    Ok(false)
}

/// Reads TCP_NODELAY of a socket (tests check the accepted side with it).
#[cfg(target_os = "linux")]
pub fn nodelay_of(fd: libc::c_int) -> Option<bool> {
    get_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY).map(|v| v != 0)
}

#[cfg(target_os = "linux")]
fn get_int(fd: libc::c_int, level: libc::c_int, name: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which is a c_int. A stale
    // or non-socket fd only yields an error.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

#[cfg(target_os = "linux")]
fn set_int(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: setsockopt reads a c_int from a valid pointer; the fd is a socket we checked.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The local address of a socket, if it is an IPv4/IPv6 one.
#[cfg(target_os = "linux")]
pub fn local_addr_of(fd: libc::c_int) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data; zeroed is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `storage`.
    let rc = unsafe {
        libc::getsockname(
            fd,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { *(&storage as *const libc::sockaddr_storage).cast() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { *(&storage as *const libc::sockaddr_storage).cast() };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(sin6.sin6_port))))
        }
        _ => None,
    }
}

#[cfg(target_os = "linux")]
fn is_tcp_listener_on(fd: libc::c_int, addr: SocketAddr) -> bool {
    get_int(fd, libc::SOL_SOCKET, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && get_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(1)
        && local_addr_of(fd) == Some(addr)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _c1 = std::net::TcpStream::connect(addr).unwrap();
        let (before, _) = l.accept().unwrap();
        assert_eq!(nodelay_of(before.as_raw_fd()), Some(false));

        assert!(set_on_listener(addr).unwrap());
        let _c2 = std::net::TcpStream::connect(addr).unwrap();
        let (after, _) = l.accept().unwrap();
        assert_eq!(nodelay_of(after.as_raw_fd()), Some(true));
        assert_eq!(local_addr_of(after.as_raw_fd()), Some(addr));
    }

    #[test]
    fn nothing_to_do_for_an_address_nobody_listens_on() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        assert!(!set_on_listener(addr).unwrap());
    }
}
