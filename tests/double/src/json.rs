//! A strict reader of one JSON value, for tests that check what the client writes (the asciinema
//! recording) without a JSON dependency. `parse_json` refuses trailing data and malformed input.

#[derive(Debug, PartialEq)]
pub enum J {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    pub fn get(&self, k: &str) -> Option<&J> {
        match self {
            J::Obj(v) => v.iter().find(|(key, _)| key == k).map(|(_, v)| v),
            _ => None,
        }
    }
}

pub fn parse_json(s: &str) -> Option<J> {
    fn ws(b: &[u8], i: &mut usize) {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    }
    fn val(b: &[u8], i: &mut usize) -> Option<J> {
        ws(b, i);
        match *b.get(*i)? {
            b'{' => {
                *i += 1;
                let mut v = Vec::new();
                ws(b, i);
                if b.get(*i) == Some(&b'}') {
                    *i += 1;
                    return Some(J::Obj(v));
                }
                loop {
                    ws(b, i);
                    let J::Str(k) = val(b, i)? else { return None };
                    ws(b, i);
                    (b.get(*i) == Some(&b':')).then_some(())?;
                    *i += 1;
                    v.push((k, val(b, i)?));
                    ws(b, i);
                    match b.get(*i)? {
                        b',' => *i += 1,
                        b'}' => {
                            *i += 1;
                            return Some(J::Obj(v));
                        }
                        _ => return None,
                    }
                }
            }
            b'[' => {
                *i += 1;
                let mut v = Vec::new();
                ws(b, i);
                if b.get(*i) == Some(&b']') {
                    *i += 1;
                    return Some(J::Arr(v));
                }
                loop {
                    v.push(val(b, i)?);
                    ws(b, i);
                    match b.get(*i)? {
                        b',' => *i += 1,
                        b']' => {
                            *i += 1;
                            return Some(J::Arr(v));
                        }
                        _ => return None,
                    }
                }
            }
            b'"' => {
                *i += 1;
                let mut out: Vec<u16> = Vec::new();
                let mut s = String::new();
                loop {
                    let c = *b.get(*i)?;
                    *i += 1;
                    match c {
                        b'"' => break,
                        b'\\' => {
                            let e = *b.get(*i)?;
                            *i += 1;
                            let ch = match e {
                                b'n' => '\n',
                                b't' => '\t',
                                b'r' => '\r',
                                b'b' => '\u{8}',
                                b'f' => '\u{c}',
                                b'/' => '/',
                                b'\\' => '\\',
                                b'"' => '"',
                                b'u' => {
                                    let h = std::str::from_utf8(b.get(*i..*i + 4)?).ok()?;
                                    *i += 4;
                                    out.push(u16::from_str_radix(h, 16).ok()?);
                                    if let Ok(t) = String::from_utf16(&out) {
                                        s.push_str(&t);
                                        out.clear();
                                    }
                                    continue;
                                }
                                _ => return None,
                            };
                            s.push(ch);
                        }
                        c if c < 0x20 => return None,
                        _ => {
                            // Copy one UTF-8 sequence as it is.
                            let start = *i - 1;
                            let len = match c {
                                0x00..=0x7f => 1,
                                0xc0..=0xdf => 2,
                                0xe0..=0xef => 3,
                                _ => 4,
                            };
                            *i = start + len;
                            s.push_str(std::str::from_utf8(b.get(start..start + len)?).ok()?);
                        }
                    }
                }
                out.is_empty().then_some(J::Str(s))
            }
            b't' if b[*i..].starts_with(b"true") => {
                *i += 4;
                Some(J::Bool(true))
            }
            b'f' if b[*i..].starts_with(b"false") => {
                *i += 5;
                Some(J::Bool(false))
            }
            b'n' if b[*i..].starts_with(b"null") => {
                *i += 4;
                Some(J::Null)
            }
            _ => {
                let start = *i;
                while *i < b.len() && (b[*i].is_ascii_digit() || b"+-.eE".contains(&b[*i])) {
                    *i += 1;
                }
                std::str::from_utf8(&b[start..*i]).ok()?.parse().ok().map(J::Num)
            }
        }
    }
    let b = s.as_bytes();
    let mut i = 0;
    let v = val(b, &mut i)?;
    ws(b, &mut i);
    (i == b.len()).then_some(v)
}
