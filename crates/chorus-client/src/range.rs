//! Key-range helpers that follow etcd's conventions, so that a range built here means on chorus
//! exactly what it means on etcd.

/// Returns the `range_end` that selects every key starting with `key`.
///
/// etcd's rule: the smallest key greater than every key with this prefix is the prefix with its
/// last byte below `0xff` incremented and everything after that byte dropped. When no such byte
/// exists (the prefix is empty or all `0xff`), no finite end exists, so the result is `[0]`,
/// which etcd reads as "to the end of the key space".
pub fn prefix_range_end(key: &[u8]) -> Vec<u8> {
    match key.iter().rposition(|&byte| byte < 0xff) {
        Some(index) => {
            let mut end = key[..=index].to_vec();
            end[index] += 1;
            end
        }
        None => vec![0],
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_range_end;

    #[test]
    fn increments_last_byte() {
        assert_eq!(prefix_range_end(b"foo"), b"fop");
        assert_eq!(prefix_range_end(b"a"), b"b");
        assert_eq!(prefix_range_end(&[0x00]), vec![0x01]);
    }

    #[test]
    fn drops_trailing_0xff_bytes() {
        assert_eq!(prefix_range_end(&[b'a', 0xff]), b"b");
        assert_eq!(prefix_range_end(&[b'a', 0xfe, 0xff, 0xff]), vec![b'a', 0xff]);
    }

    #[test]
    fn no_finite_end_means_from_key() {
        assert_eq!(prefix_range_end(&[0xff]), vec![0]);
        assert_eq!(prefix_range_end(&[0xff, 0xff]), vec![0]);
        assert_eq!(prefix_range_end(b""), vec![0]);
    }
}
