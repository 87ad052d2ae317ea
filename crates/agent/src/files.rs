//! File operations: write a file from streamed chunks, read a file as bounded chunks.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc};

use hutch_protocol::{ErrorCode, GuestMsg, OpError, ReadFileRequest, WriteFileRequest, MAX_CHUNK};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    ops::io_error,
    server::{invalid, Conn, Input, OpIo},
};

/// Writes a file from the host's chunks; the file appears whole (rename) or not at all.
pub async fn write(conn: Arc<Conn>, op: u32, req: WriteFileRequest, mut io: OpIo) {
    let result = write_inner(&conn, op, &req, &mut io).await;
    // Keep crediting anything still in flight so the host is never left blocked.
    if result.is_err() {
        io.input.close();
    }
    conn.finish(op, result.map(|()| GuestMsg::Done));
}

async fn write_inner(
    conn: &Conn,
    op: u32,
    req: &WriteFileRequest,
    io: &mut OpIo,
) -> Result<(), OpError> {
    let path = absolute(&req.path)?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    if req.make_parents {
        tokio::fs::create_dir_all(parent).await.map_err(io_error)?;
    }
    let name = path
        .file_name()
        .ok_or_else(|| invalid("path names no file"))?;
    let tmp = parent.join(format!(".{}.hutch-{op}", name.to_string_lossy()));
    let mut file = tokio::fs::File::create(&tmp).await.map_err(io_error)?;
    let outcome = async {
        while let Some(item) = io.input.recv().await {
            match item {
                Input::Data(d) => {
                    file.write_all(&d).await.map_err(io_error)?;
                    conn.send(op, GuestMsg::Credit(d.len() as u32));
                }
                Input::Eof => {
                    file.flush().await.map_err(io_error)?;
                    let perms = std::fs::Permissions::from_mode(req.mode & 0o7777);
                    tokio::fs::set_permissions(&tmp, perms)
                        .await
                        .map_err(io_error)?;
                    return tokio::fs::rename(&tmp, &path).await.map_err(io_error);
                }
            }
        }
        Err(invalid("file write abandoned"))
    }
    .await;
    if outcome.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    outcome
}

/// Streams a regular file to the host, refusing files larger than the request allows.
pub async fn read(conn: Arc<Conn>, op: u32, req: ReadFileRequest, io: OpIo) {
    let result = read_inner(&conn, op, &req, &io)
        .await
        .map(GuestMsg::FileEnd);
    conn.finish(op, result);
}

async fn read_inner(
    conn: &Conn,
    op: u32,
    req: &ReadFileRequest,
    io: &OpIo,
) -> Result<u64, OpError> {
    let path = absolute(&req.path)?;
    let mut file = tokio::fs::File::open(&path).await.map_err(io_error)?;
    let meta = file.metadata().await.map_err(io_error)?;
    if !meta.is_file() {
        return Err(invalid(format!("not a regular file: {}", req.path)));
    }
    if meta.len() > req.max_bytes {
        return Err(too_large(req));
    }
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).await.map_err(io_error)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
        if total > req.max_bytes {
            return Err(too_large(req));
        }
        if !conn
            .send_data(op, &io.credit, GuestMsg::FileData(buf[..n].to_vec()))
            .await
        {
            return Err(invalid("file read abandoned"));
        }
    }
}

fn too_large(req: &ReadFileRequest) -> OpError {
    OpError {
        code: ErrorCode::TooLarge,
        message: format!("{} is larger than {} bytes", req.path, req.max_bytes),
    }
}

fn absolute(path: &str) -> Result<&Path, OpError> {
    let p = Path::new(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(invalid(format!("path must be absolute: {path}")))
    }
}
