//! A restricted unpickler for torch `data.pkl` records.
//!
//! It builds plain data only and never executes anything: GLOBALs are checked against an allow-list (what
//! torch's `weights_only` loader accepts for tensors, plus the xser / NxD reference classes), and every
//! REDUCE / NEWOBJ is interpreted by this module for the few callables it knows.

use crate::dtype::DType;
use crate::error::{FormatError, Result};
use crate::view::Layout;

/// A decoded pickle value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// A bool.
    Bool(bool),
    /// An integer that fits in i64.
    Int(i64),
    /// A float.
    Float(f64),
    /// A str.
    Str(String),
    /// A bytes object.
    Bytes(Vec<u8>),
    /// A tuple (also `torch.Size`).
    Tuple(Vec<Value>),
    /// A list (also a set).
    List(Vec<Value>),
    /// A dict or OrderedDict, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A torch dtype object (`torch.bfloat16`).
    DType(DType),
    /// A typed storage reference (from a persistent id).
    Storage(StorageRef),
    /// A dense tensor.
    Tensor(TensorValue),
    /// An instance of an allowed class built with NEWOBJ/BUILD (xser `TensorReference`...).
    Object {
        /// `module.Name` of the class.
        class: String,
        /// The state dict applied by BUILD (its `__dict__`).
        state: Vec<(Value, Value)>,
    },
    /// A reference to an allowed global that was never called.
    Global(String),
}

/// A storage named by a persistent id: `('storage', torch.<X>Storage, key, location, numel)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    /// Element type of the storage.
    pub dtype: DType,
    /// Record key: the bytes are in `data/<key>`.
    pub key: String,
    /// Device tag (`cpu`, `cuda:0`...).
    pub location: String,
    /// Length in elements.
    pub numel: usize,
}

/// A tensor built by `torch._utils._rebuild_tensor_v2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorValue {
    /// The storage it views.
    pub storage: StorageRef,
    /// Offset, shape and strides in elements.
    pub layout: Layout,
    /// The `requires_grad` flag.
    pub requires_grad: bool,
}

impl Value {
    /// The string, if this is a str.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is an int.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// Looks up a str key in a dict value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

/// Calls `leaf(name, value)` for every value that is not a dict, found under dict keys (str or int)
/// from `root`, with the keys joined by dots (`model.layers.0.x`); a non-dict root is named `""`.
pub fn for_each_named<'a>(root: &'a Value, leaf: &mut dyn FnMut(String, &'a Value)) {
    fn walk<'a>(v: &'a Value, prefix: String, leaf: &mut dyn FnMut(String, &'a Value)) {
        let Value::Dict(items) = v else {
            return leaf(prefix, v);
        };
        for (k, v) in items {
            let key = match k {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                _ => continue,
            };
            let name = if prefix.is_empty() {
                key
            } else {
                format!("{prefix}.{key}")
            };
            walk(v, name, leaf);
        }
    }
    walk(root, String::new(), leaf)
}

/// GLOBALs this unpickler will resolve. Anything else is refused before it is used.
fn allowed_global(module: &str, name: &str) -> Option<Callable> {
    Some(match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Callable::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Callable::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Callable::RebuildParameter,
        ("collections", "OrderedDict") => Callable::OrderedDict,
        ("torch", "Size") => Callable::Size,
        ("_codecs", "encode") => Callable::CodecsEncode,
        ("__builtin__", "set") | ("builtins", "set") => Callable::Set,
        ("torch_xla.utils.serialization", "TensorReference")
        | ("neuronx_distributed.trainer.checkpoint", "_InternalTensorReference") => {
            Callable::Class(format!("{module}.{name}"))
        }
        ("torch", storage) if storage.ends_with("Storage") => {
            Callable::StorageClass(DType::from_torch_storage_class(storage)?)
        }
        ("torch", dtype) => Callable::DType(DType::from_torch_name(dtype)?),
        _ => return None,
    })
}

/// What an allowed GLOBAL stands for.
#[derive(Debug, Clone, PartialEq)]
enum Callable {
    RebuildTensorV2,
    RebuildParameter,
    OrderedDict,
    Size,
    CodecsEncode,
    Set,
    StorageClass(DType),
    DType(DType),
    Class(String),
}

/// A node of the unpickling arena. Memo and stack hold node ids, so a container mutated after it was
/// memoized is seen mutated through every reference, as in Python.
#[derive(Debug, Clone)]
enum Node {
    Value(Value),
    Tuple(Vec<usize>),
    List(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Global(Callable),
    Object { class: String, state: Option<usize> },
}

/// Objects the VM may create: far above any real state dict (a 70B shard holds hundreds of tensors).
const MAX_NODES: usize = 20_000_000;
/// Values a decoded tree may hold once shared references are expanded: bounds memory against pickles
/// that reference one container many times over (found by fuzzing).
const MAX_TREE_VALUES: usize = 4_000_000;
const MAX_DEPTH: usize = 200;

enum Slot {
    Mark,
    Node(usize),
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<Slot>,
    memo: std::collections::HashMap<u32, usize>,
}

fn bad(msg: impl Into<String>) -> FormatError {
    FormatError::Corrupt(format!("pickle: {}", msg.into()))
}

/// Unpickles `data`, resolving persistent ids as torch storages.
pub fn unpickle(data: &[u8]) -> Result<Value> {
    let mut vm = Vm {
        data,
        pos: 0,
        nodes: Vec::new(),
        stack: Vec::new(),
        memo: Default::default(),
    };
    let root = vm.run()?;
    let mut budget = MAX_TREE_VALUES;
    vm.materialize(root, 0, &mut budget)
}

impl<'a> Vm<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| bad("truncated"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| bad("unterminated text argument"))?;
        let s = std::str::from_utf8(&rest[..nl]).map_err(|_| bad("text argument is not UTF-8"))?;
        self.pos += nl + 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> Result<String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| bad("string is not valid UTF-8"))
    }

    fn alloc(&mut self, node: Node) -> Result<usize> {
        if self.nodes.len() >= MAX_NODES {
            return Err(bad("too many objects"));
        }
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }
    fn push(&mut self, node: Node) -> Result<()> {
        let id = self.alloc(node)?;
        self.stack.push(Slot::Node(id));
        Ok(())
    }
    fn push_value(&mut self, v: Value) -> Result<()> {
        self.push(Node::Value(v))
    }
    fn pop(&mut self) -> Result<usize> {
        match self.stack.pop() {
            Some(Slot::Node(id)) => Ok(id),
            Some(Slot::Mark) => Err(bad("unexpected MARK on the stack")),
            None => Err(bad("stack underflow")),
        }
    }
    fn top(&self) -> Result<usize> {
        match self.stack.last() {
            Some(Slot::Node(id)) => Ok(*id),
            _ => Err(bad("stack underflow")),
        }
    }
    fn pop_mark(&mut self) -> Result<Vec<usize>> {
        let mark = self
            .stack
            .iter()
            .rposition(|s| matches!(s, Slot::Mark))
            .ok_or_else(|| bad("no MARK on the stack"))?;
        let items = self
            .stack
            .drain(mark + 1..)
            .map(|s| match s {
                Slot::Node(id) => id,
                Slot::Mark => unreachable!(),
            })
            .collect();
        self.stack.pop();
        Ok(items)
    }
    fn memo_put(&mut self, key: u32) -> Result<()> {
        let id = self.top()?;
        self.memo.insert(key, id);
        Ok(())
    }
    fn memo_get(&mut self, key: u32) -> Result<()> {
        let id = *self
            .memo
            .get(&key)
            .ok_or_else(|| bad(format!("memo key {key} used before it was set")))?;
        self.stack.push(Slot::Node(id));
        Ok(())
    }
    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        let callable = allowed_global(module, name).ok_or_else(|| {
            FormatError::Unsupported(format!(
                "pickle refers to {module}.{name}, which is not allowed (only tensors, dicts and the xser/NxD reference classes are read; nothing is executed)"
            ))
        })?;
        match callable {
            Callable::DType(d) => self.push_value(Value::DType(d)),
            other => self.push(Node::Global(other)),
        }
    }
    fn append_to(&mut self, list: usize, items: Vec<usize>) -> Result<()> {
        match &mut self.nodes[list] {
            Node::List(v) => {
                v.extend(items);
                Ok(())
            }
            _ => Err(bad("APPEND to something that is not a list")),
        }
    }
    fn set_items(&mut self, dict: usize, items: Vec<usize>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(bad("SETITEMS with an odd number of items"));
        }
        match &mut self.nodes[dict] {
            Node::Dict(v) => {
                for pair in items.chunks(2) {
                    v.push((pair[0], pair[1]));
                }
                Ok(())
            }
            _ => Err(bad("SETITEM on something that is not a dict")),
        }
    }

    fn run(&mut self) -> Result<usize> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.u64()?; // FRAME: framing is only a hint
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Slot::Mark),
                b'0' => {
                    self.stack.pop().ok_or_else(|| bad("POP on empty stack"))?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let id = self.top()?;
                    self.stack.push(Slot::Node(id));
                }
                b'N' => self.push_value(Value::None)?,
                0x88 => self.push_value(Value::Bool(true))?,
                0x89 => self.push_value(Value::Bool(false))?,
                b'K' => {
                    let v = self.u8()?;
                    self.push_value(Value::Int(v as i64))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push_value(Value::Int(v as i64))?
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push_value(Value::Int(v as i64))?
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let b = self.take(n)?;
                    self.push_value(Value::Int(decode_long(b)?))?
                }
                b'I' | b'L' => {
                    let text = self.line()?;
                    let v = match text {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        t => Value::Int(
                            t.trim_end_matches('L')
                                .parse()
                                .map_err(|_| bad("bad INT literal"))?,
                        ),
                    };
                    self.push_value(v)?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push_value(Value::Float(v))?
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.utf8(n)?;
                    self.push_value(Value::Str(s))?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.utf8(n)?;
                    self.push_value(Value::Str(s))?
                }
                0x8d => {
                    let n = usize::try_from(self.u64()?).map_err(|_| bad("string too long"))?;
                    let s = self.utf8(n)?;
                    self.push_value(Value::Str(s))?
                }
                b'U' | b'T' => {
                    let n = if op == b'U' {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    // Python 2 str: torch reads it as latin-1 text.
                    let s = self.take(n)?.iter().map(|&b| b as char).collect();
                    self.push_value(Value::Str(s))?
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => self.u8()? as usize,
                        _ => usize::try_from(self.u64()?).map_err(|_| bad("bytes too long"))?,
                    };
                    let b = self.take(n)?.to_vec();
                    self.push_value(Value::Bytes(b))?
                }
                b')' => self.push(Node::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(bad("stack underflow in TUPLEn"));
                    }
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items))?
                }
                b']' | 0x8f => self.push(Node::List(Vec::new()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items))?
                }
                b'}' => self.push(Node::Dict(Vec::new()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    let id = self.alloc(Node::Dict(Vec::new()))?;
                    self.set_items(id, items)?;
                    self.stack.push(Slot::Node(id));
                }
                b'a' => {
                    let item = self.pop()?;
                    let list = self.top()?;
                    self.append_to(list, vec![item])?
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.append_to(list, items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let dict = self.top()?;
                    self.set_items(dict, vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let dict = self.top()?;
                    self.set_items(dict, items)?
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?
                }
                b'p' => {
                    let k = self.line()?.parse().map_err(|_| bad("bad PUT index"))?;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?
                }
                b'g' => {
                    let k = self.line()?.parse().map_err(|_| bad("bad GET index"))?;
                    self.memo_get(k)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Node::Value(Value::Str(m)), Node::Value(Value::Str(n))) =
                        (self.nodes[module].clone(), self.nodes[name].clone())
                    else {
                        return Err(bad("STACK_GLOBAL needs two strings"));
                    };
                    self.global(&m, &n)?
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(pid)?;
                    self.push_value(Value::Storage(storage))?
                }
                b'P' => {
                    return Err(FormatError::Unsupported(
                        "pickle uses a text persistent id (not a torch file)".into(),
                    ))
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let node = self.reduce(func, args)?;
                    self.push(node)?
                }
                0x81 => {
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    match &self.nodes[cls] {
                        Node::Global(Callable::Class(name)) => {
                            let class = name.clone();
                            self.push(Node::Object { class, state: None })?
                        }
                        _ => {
                            return Err(FormatError::Unsupported(
                                "NEWOBJ on a class that is not allowed".into(),
                            ))
                        }
                    }
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    // Dicts (OrderedDict `_metadata`) and tensors (parameter state) ignore their BUILD state.
                    if let Node::Object { state: slot, .. } = &mut self.nodes[target] {
                        *slot = Some(state);
                    }
                }
                other => {
                    return Err(FormatError::Unsupported(format!(
                        "pickle opcode 0x{other:02x} at byte {} is not supported",
                        self.pos - 1
                    )))
                }
            }
        }
    }

    fn persistent_load(&mut self, pid: usize) -> Result<StorageRef> {
        let Node::Tuple(items) = self.nodes[pid].clone() else {
            return Err(bad("persistent id is not a tuple"));
        };
        if items.len() < 5
            || !matches!(&self.nodes[items[0]], Node::Value(Value::Str(s)) if s == "storage")
        {
            return Err(bad(
                "persistent id is not ('storage', class, key, location, numel)",
            ));
        }
        let dtype = match &self.nodes[items[1]] {
            Node::Global(Callable::StorageClass(d)) => *d,
            _ => {
                return Err(FormatError::Unsupported(
                    "storage of an unsupported type (torch 2.1 dtypes only)".into(),
                ))
            }
        };
        let key = match &self.nodes[items[2]] {
            Node::Value(Value::Str(s)) => s.clone(),
            _ => return Err(bad("storage key is not a string")),
        };
        let location = match &self.nodes[items[3]] {
            Node::Value(Value::Str(s)) => s.clone(),
            _ => return Err(bad("storage location is not a string")),
        };
        let numel = match &self.nodes[items[4]] {
            Node::Value(Value::Int(n)) if *n >= 0 => *n as usize,
            _ => return Err(bad("storage size is not a non-negative integer")),
        };
        Ok(StorageRef {
            dtype,
            key,
            location,
            numel,
        })
    }

    fn ints(&self, id: usize, what: &str) -> Result<Vec<usize>> {
        let items = match &self.nodes[id] {
            Node::Tuple(items) | Node::List(items) => items,
            _ => return Err(bad(format!("tensor {what} is not a tuple"))),
        };
        items
            .iter()
            .map(|&i| match &self.nodes[i] {
                Node::Value(Value::Int(v)) if *v >= 0 => Ok(*v as usize),
                _ => Err(bad(format!(
                    "tensor {what} holds something other than a non-negative int"
                ))),
            })
            .collect()
    }

    fn reduce(&mut self, func: usize, args: usize) -> Result<Node> {
        let Node::Global(callable) = self.nodes[func].clone() else {
            return Err(FormatError::Unsupported(
                "REDUCE on something that is not an allowed callable".into(),
            ));
        };
        let Node::Tuple(a) = self.nodes[args].clone() else {
            return Err(bad("REDUCE arguments are not a tuple"));
        };
        let arg = |i: usize| {
            a.get(i)
                .copied()
                .ok_or_else(|| bad("too few arguments in REDUCE"))
        };
        Ok(match callable {
            Callable::RebuildTensorV2 => {
                let Node::Value(Value::Storage(storage)) = self.nodes[arg(0)?].clone() else {
                    return Err(bad("_rebuild_tensor_v2 without a storage"));
                };
                let offset = match &self.nodes[arg(1)?] {
                    Node::Value(Value::Int(o)) if *o >= 0 => *o as usize,
                    _ => return Err(bad("tensor offset is not a non-negative int")),
                };
                let shape = self.ints(arg(2)?, "size")?;
                let strides = self.ints(arg(3)?, "stride")?;
                if shape.len() != strides.len() {
                    return Err(bad("tensor size and stride have different lengths"));
                }
                let requires_grad = matches!(self.nodes[arg(4)?], Node::Value(Value::Bool(true)));
                let layout = Layout {
                    shape,
                    strides,
                    offset,
                };
                Node::Value(Value::Tensor(TensorValue {
                    storage,
                    layout,
                    requires_grad,
                }))
            }
            Callable::RebuildParameter => self.nodes[arg(0)?].clone(),
            Callable::OrderedDict => {
                let mut pairs = Vec::new();
                if let Some(&items) = a.first() {
                    let entries = match &self.nodes[items] {
                        Node::List(v) | Node::Tuple(v) => v.clone(),
                        _ => return Err(bad("OrderedDict argument is not a list")),
                    };
                    for e in entries {
                        match &self.nodes[e] {
                            Node::Tuple(kv) | Node::List(kv) if kv.len() == 2 => {
                                pairs.push((kv[0], kv[1]))
                            }
                            _ => return Err(bad("OrderedDict item is not a pair")),
                        }
                    }
                }
                Node::Dict(pairs)
            }
            Callable::Size => match &self.nodes[arg(0)?] {
                Node::Tuple(v) | Node::List(v) => Node::Tuple(v.clone()),
                _ => return Err(bad("torch.Size argument is not a tuple")),
            },
            Callable::Set => match &self.nodes[arg(0)?] {
                Node::Tuple(v) | Node::List(v) => Node::List(v.clone()),
                _ => return Err(bad("set argument is not a list")),
            },
            Callable::CodecsEncode => match &self.nodes[arg(0)?] {
                Node::Value(Value::Str(s)) => {
                    Node::Value(Value::Bytes(s.chars().map(|c| c as u32 as u8).collect()))
                }
                _ => return Err(bad("_codecs.encode argument is not a str")),
            },
            Callable::StorageClass(_) | Callable::DType(_) | Callable::Class(_) => {
                return Err(FormatError::Unsupported(
                    "pickle calls a class this reader does not construct".into(),
                ))
            }
        })
    }

    /// Turns the arena graph under `id` into an owned value tree (bounded against cycles and blow-ups).
    fn materialize(&self, id: usize, depth: usize, budget: &mut usize) -> Result<Value> {
        if depth > MAX_DEPTH {
            return Err(bad("nesting too deep (or a cycle)"));
        }
        *budget = budget
            .checked_sub(1)
            .ok_or_else(|| bad("object graph too large"))?;
        let m = |i: &usize, budget: &mut usize| self.materialize(*i, depth + 1, budget);
        Ok(match &self.nodes[id] {
            Node::Value(v) => v.clone(),
            Node::Tuple(items) => {
                Value::Tuple(items.iter().map(|i| m(i, budget)).collect::<Result<_>>()?)
            }
            Node::List(items) => {
                Value::List(items.iter().map(|i| m(i, budget)).collect::<Result<_>>()?)
            }
            Node::Dict(items) => Value::Dict(
                items
                    .iter()
                    .map(|(k, v)| Ok((m(k, budget)?, m(v, budget)?)))
                    .collect::<Result<_>>()?,
            ),
            Node::Global(c) => Value::Global(format!("{c:?}")),
            Node::Object { class, state } => {
                let state = match state {
                    Some(s) => match m(s, budget)? {
                        Value::Dict(items) => items,
                        _ => return Err(bad(format!("{class} state is not a dict"))),
                    },
                    None => Vec::new(),
                };
                Value::Object {
                    class: class.clone(),
                    state,
                }
            }
        })
    }
}

fn decode_long(b: &[u8]) -> Result<i64> {
    if b.is_empty() {
        return Ok(0);
    }
    if b.len() > 8 {
        // Values beyond i64 only appear in adversarial files; torch never writes them for tensors.
        return Err(FormatError::Unsupported(
            "integer wider than 64 bits".into(),
        ));
    }
    let fill = if b[b.len() - 1] & 0x80 != 0 { 0xFF } else { 0 };
    let mut buf = [fill; 8];
    buf[..b.len()].copy_from_slice(b);
    Ok(i64::from_le_bytes(buf))
}

/// Fuzzing entry point: unpickles arbitrary bytes, ignoring the result. Must never panic.
pub fn fuzz_unpickle(data: &[u8]) {
    let _ = unpickle(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memo-free `data.pkl` of `{"w": bf16 [[0,1,2],[3,4,5]]}` from the torch-format spec.
    const MINIMAL: &[u8] = b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nBFloat16Storage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQK\x00K\x02K\x03\x86K\x03K\x01\x86\x89ccollections\nOrderedDict\n)RtRs.";

    #[test]
    fn reads_a_tensor_dict() {
        let v = unpickle(MINIMAL).unwrap();
        let Some(Value::Tensor(t)) = v.get("w") else {
            panic!("{v:?}")
        };
        assert_eq!(t.storage.dtype, DType::BF16);
        assert_eq!(t.storage.key, "0");
        assert_eq!(t.storage.numel, 6);
        assert_eq!(
            t.layout,
            Layout {
                shape: vec![2, 3],
                strides: vec![3, 1],
                offset: 0
            }
        );
    }

    #[test]
    fn refuses_forbidden_globals() {
        let evil = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        let err = unpickle(evil).unwrap_err().to_string();
        assert!(err.contains("os.system"), "{err}");
    }

    #[test]
    fn never_panics_on_truncation() {
        for cut in 0..MINIMAL.len() {
            let _ = unpickle(&MINIMAL[..cut]);
        }
    }

    #[test]
    fn shared_mutable_containers_follow_python_semantics() {
        // l = []; d = {'a': l, 'b': l}; l.append(1) -- emitted as: memoize l while empty, append later.
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00a]q\x01X\x01\x00\x00\x00bh\x01uh\x01K\x01a0.";
        // After SETITEMS the dict is on the stack; `h\x01 K\x01 a` appends to the memoized list, `0` pops it.
        let v = unpickle(p).unwrap();
        assert_eq!(v.get("a"), Some(&Value::List(vec![Value::Int(1)])));
        assert_eq!(v.get("b"), Some(&Value::List(vec![Value::Int(1)])));
    }

    #[test]
    fn shared_reference_blowup_is_bounded() {
        // l0 = [], l_{i+1} = [l_i, l_i] for 40 levels: 2^40 values once expanded.
        let mut p = b"\x80\x02]q\x00".to_vec();
        for i in 0..40u8 {
            p.extend_from_slice(&[b'(', b'h', i, b'h', i, b'l', b'q', i + 1]);
        }
        p.push(b'.');
        let err = unpickle(&p).unwrap_err().to_string();
        assert!(
            err.contains("too large") || err.contains("too deep"),
            "{err}"
        );
    }

    #[test]
    fn long_values() {
        assert_eq!(decode_long(&[0, 0, 0, 0, 0, 1]).unwrap(), 1 << 40);
        assert_eq!(decode_long(&[0xfe]).unwrap(), -2);
    }
}
